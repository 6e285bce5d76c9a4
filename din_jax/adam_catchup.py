"""TF1 dense Adam on row-sparse tables: the closed-form catch-up of the steps a row was not touched.

DeepRec's DIN keeps its tables as ordinary variables, so TF1 AdamOptimizer (`_apply_sparse_shared`,
tensorflow/python/training/adam.py) decays m and v of every row and moves every row on every step,
gradient or not. A row untouched for the k steps tau = s+1 .. s+k (its gradient 0) follows, in closed form,

    m_{s+i} = b1^i m_s,   v_{s+i} = b2^i v_s,
    w_{s+k} = w_s - m_s * sum_{i=1..k} lr_{s+i} b1^i / (sqrt(v_s) a^i + eps),   a = sqrt(b2),
    lr_tau  = lr sqrt(1 - b2^tau) / (1 - b1^tau).

So a row need only be brought up to date when it is next touched (before that step's own update), or
when something reads every row (evaluation, checkpoints, export, eviction): each row keeps the step
through which it is up to date (`last`). The cost per touched row is O(1):

- The terms shrink as (b1 / a)^i: past HORIZON terms their sum is below float32 resolution, so the sum
  stops there.
- With x = sqrt(v_s), D = x + eps and d_i = a^i - 1 (in (-0.1, 0] over the horizon), each denominator is
  D (1 - r d_i) with r = -x / D in (-1, 0], and 1 / (1 - r d_i) = sum_j (r d_i)^j. Hence
      sum_i lr_{s+i} b1^i / (x a^i + eps) = (1 / D) sum_{j=0..ORDER} r^j P_j(s, k),
      P_j(s, k) = sum_{i=1..min(k, HORIZON)} lr_{s+i} b1^i d_i^j,
  which is exact to 5e-10 (float64) at ORDER 4: the powers of |r d_i| <= 5e-4 i are weighted by b1^i.
- P_j depends on the row only through (s, k). At a catch-up through step T a row has s = T - k, so for
  k <= HORIZON the coefficients are one small [HORIZON + 1, ORDER + 1] table per T (`_window_table`, a
  convolution of the last HORIZON learning rates; the three tables' identical copies are one for XLA); a
  row idle longer needs P_j(s, HORIZON), tabulated once for every s below the step past which lr_tau
  equals lr in float32 (`_stale_table`), and constant after it.

lr_tau is computed with the same float32 expression as din_jax.optim.tf_adam, so the caught-up rows
equal the whole-table rule's to float32 rounding (tests/test_adam_catchup.py measures it).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np

ORDER = 4         # terms of the expansion in r d_i (see the module docstring)
TOLERANCE = 2.0**-30  # the horizon's dropped tail, relative to the first term


def horizon(b1: float, b2: float) -> int:
    """The number of catch-up terms: (b1 / sqrt(b2))^i falls below TOLERANCE after it."""
    ratio = b1 / math.sqrt(b2)
    if not 0 < ratio < 1:
        raise ValueError(f"exact Adam needs b1 < sqrt(b2) for its catch-up to converge (b1={b1}, b2={b2})")
    return math.ceil(math.log(TOLERANCE) / math.log(ratio))


def learning_rates(lr: float, b1: float, b2: float, t: jax.Array | np.ndarray, xp=jnp):
    """lr_t = lr sqrt(1 - b2^t) / (1 - b1^t) in float32, as din_jax.optim.tf_adam computes it (t >= 1)."""
    t = xp.asarray(t, xp.float32)
    one = xp.float32(1)
    return xp.float32(lr) * xp.sqrt(one - xp.float32(b2) ** t) / (one - xp.float32(b1) ** t)


def _term_weights(b1: float, b2: float, size: int) -> np.ndarray:
    """[size, ORDER + 1]: b1^i d_i^j for i = 1..size, d_i = sqrt(b2)^i - 1 (float64, then float32)."""
    i = np.arange(1, size + 1, dtype=np.float64)
    d = np.expm1(i * 0.5 * np.log(b2))
    return (b1**i)[:, None] * d[:, None] ** np.arange(ORDER + 1)


@functools.lru_cache(maxsize=8)
def _stale_table(lr: float, b1: float, b2: float) -> tuple[np.ndarray, int]:
    """(P_j(s, HORIZON) for s = 0..S as [S + 1, ORDER + 1] float32, S): for s >= S every lr_{s+i} is lr in
    float32, so P_j(S, HORIZON) holds for every later s."""
    k = horizon(b1, b2)
    t = np.arange(1, 200_000, dtype=np.float64)
    rates = np.asarray(learning_rates(lr, b1, b2, t, xp=np), np.float64)
    differs = np.flatnonzero(rates != np.float32(lr))
    last = int(t[differs[-1]]) if differs.size else 0  # lr_t == lr for every t > last
    steps = last + 1                                    # s >= steps: lr_{s+i} == lr for i >= 1
    rates = np.concatenate([[0.0], rates])              # rates[t] = lr_t
    weights = _term_weights(b1, b2, k)
    windows = np.lib.stride_tricks.sliding_window_view(rates[1:steps + k + 1], k)  # [steps + 1, k]: lr_{s+1..s+k}
    return (windows @ weights).astype(np.float32), steps


def _window_table(lr: float, b1: float, b2: float, through: jax.Array) -> jax.Array:
    """[HORIZON + 1, ORDER + 1]: P_j(through - k, k) for k = 0..HORIZON (rows of k > through are unused).

    P_j(through - k, k) = sum_{i=1..k} lr_{through-k+i} w_ij is one correlation of the last HORIZON learning rates
    (zero-padded, so that terms past k vanish) with each column of w: a small convolution, not a [K, K] gather.
    """
    k = horizon(b1, b2)
    weights = jnp.asarray(_term_weights(b1, b2, k), jnp.float32)                   # [K, J+1]: w_ij
    tau = through - k + 1 + jnp.arange(k)                                           # lr_tau, tau = through-K+1..through
    rates = jnp.where(tau >= 1, learning_rates(lr, b1, b2, jnp.maximum(tau, 1)), 0.0)
    padded = jnp.concatenate([rates, jnp.zeros(k, jnp.float32)])                  # [2K]
    # out[j, o] = sum_n padded[o + n] w_{n+1, j}; the row caught up by k steps is o = K - k.
    out = jax.lax.conv_general_dilated(padded[None, None], weights.T[:, None], (1,), "VALID")[0]  # [J+1, K+1]
    return out[:, ::-1].T


def catch_up(w: jax.Array, m: jax.Array, v: jax.Array, last: jax.Array, through: jax.Array, *, lr: float,
             b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rows w [N, E] (any float dtype) with moments m, v [N, E] (float32), up to date through step last [N],
    brought up to date through step `through` (a scalar >= last): (w, m, v) after steps last+1 .. through with
    gradient 0 under TF1 Adam. Rows with last == through are returned unchanged."""
    k_max = horizon(b1, b2)
    idle = (through - last).astype(jnp.int32)                                          # [N]
    stale, steps = _stale_table(lr, b1, b2)
    coefficients = jnp.where((idle <= k_max)[:, None],
                             _window_table(lr, b1, b2, through)[jnp.minimum(idle, k_max)],
                             jnp.asarray(stale)[jnp.clip(last, 0, steps)])            # [N, J+1]
    x = jnp.sqrt(v)
    inverse = 1.0 / (x + eps)                                                          # 1 / D
    r = -x * inverse
    total = coefficients[:, ORDER:ORDER + 1]
    for j in range(ORDER - 1, -1, -1):  # Horner in r: sum_j r^j P_j
        total = total * r + coefficients[:, j:j + 1]
    moved = (w.astype(jnp.float32) - m * total * inverse).astype(w.dtype)
    decay = idle.astype(jnp.float32)[:, None]
    return moved, m * jnp.float32(b1) ** decay, v * jnp.float32(b2) ** decay
