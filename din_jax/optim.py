"""DeepRec's optimizers: optax GradientTransformations for dense tensors, row-wise rules for embedding rows.

Every optimizer clips each gradient tensor to norm 5 first (`tf.clip_by_norm` per tensor, as DeepRec's
DIN does before `apply_gradients`). Each rule exists twice, with the same math:
- `dense`: an optax GradientTransformation over a pytree (dense layers; and the embedding tables
  when `config.sparse_embeddings=False`, the O(vocabulary) reference path);
- `rows`: the update of the rows an embedding table touched in a step, with per-row optimizer slots
  gathered and scattered alongside (the row-sparse path; see `din_jax/embedding.py`).
On rows that every step touches the two give the same numbers; for Adagrad and AdagradDecay they are
the same for every row (an untouched row has gradient 0, which moves neither weight nor accumulator,
and AdagradDecay's missed decays are applied when the row is next touched).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adamasync", "adagrad", "adagraddecay")
ADAGRAD_INITIAL_ACCUMULATOR = 0.1


def clip_by_norm_per_tensor(max_norm: float) -> optax.GradientTransformation:
    """tf.clip_by_norm on every leaf: g * max_norm / max(||g||_2, max_norm)."""

    def update_fn(updates, state, params=None):
        del params
        return jax.tree.map(lambda g: clip_tensor(g, max_norm), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def clip_tensor(g: jax.Array, max_norm: float) -> jax.Array:
    """One tensor clipped to L2 norm `max_norm` (computed in fp32)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
    return (g * (max_norm / jnp.maximum(norm, max_norm))).astype(g.dtype)


def _zeros32(tree):
    return jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), tree)


def _cast_like(update_tree, like_tree):
    return jax.tree.map(lambda u, p: u.astype(p.dtype), update_tree, like_tree)


# ------------------------------------------------------------------------------------------ Adam
class TFAdamState(NamedTuple):
    """Step count and first/second moments, one pair per parameter."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def tf_adam(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """TF1 AdamOptimizer: m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; w -= lr_t m / (sqrt(v) + eps),
    lr_t = lr sqrt(1 - b2^t) / (1 - b1^t).

    Differs from optax.adam in where epsilon sits: TF1 adds it outside the bias correction
    (tensorflow/python/training/adam.py; Kingma & Ba, section 2, "efficient version").
    """

    def init_fn(params):
        return TFAdamState(jnp.zeros([], jnp.int32), _zeros32(params), _zeros32(params))

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, updates)
        t = count.astype(jnp.float32)
        lr_t = learning_rate * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        steps = jax.tree.map(lambda m, v: -lr_t * m / (jnp.sqrt(v) + eps), mu, nu)
        return _cast_like(steps, updates), TFAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


class AdamAsyncState(NamedTuple):
    """Moments and, per variable, its own beta powers (DeepRec keeps them as slots of each variable)."""

    beta1_power: optax.Updates
    beta2_power: optax.Updates
    mu: optax.Updates
    nu: optax.Updates


def adam_async(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """DeepRec AdamAsyncOptimizer on dense variables: TF1 Adam with per-variable beta powers.

    Each variable advances its own beta1_power / beta2_power when it is updated (DeepRec
    docs/docs_en/AdamAsync-Optimizer.md), so variables need not share a global step. For embedding
    tables the rows are updated lazily: see `adam_rows(lazy_beta_powers=True)`.
    """

    def init_fn(params):
        ones = lambda: jax.tree.map(lambda p: jnp.ones([], jnp.float32), params)  # noqa: E731
        # Two distinct trees: one buffer in two places cannot be donated to the jitted step.
        return AdamAsyncState(ones(), ones(), _zeros32(params), _zeros32(params))

    def update_fn(updates, state, params=None):
        del params
        p1 = jax.tree.map(lambda p: p * b1, state.beta1_power)
        p2 = jax.tree.map(lambda p: p * b2, state.beta2_power)
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, updates)
        steps = jax.tree.map(lambda m, v, q1, q2: -learning_rate * jnp.sqrt(1 - q2) / (1 - q1) * m / (jnp.sqrt(v) + eps),
                             mu, nu, p1, p2)
        return _cast_like(steps, updates), AdamAsyncState(p1, p2, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------------------- Adagrad
def tf_adagrad(learning_rate: float, initial_accumulator_value: float = ADAGRAD_INITIAL_ACCUMULATOR
               ) -> optax.GradientTransformation:
    """TF1 AdagradOptimizer: acc += g^2; w -= lr g / sqrt(acc), with acc starting at 0.1."""

    def init_fn(params):
        return optax.ScaleByRssState(
            sum_of_squares=jax.tree.map(lambda p: jnp.full(p.shape, initial_accumulator_value, jnp.float32), params))

    def update_fn(updates, state, params=None):
        del params
        acc = jax.tree.map(lambda a, g: a + jnp.square(g.astype(jnp.float32)), state.sum_of_squares, updates)
        steps = jax.tree.map(lambda a, g: -learning_rate * g.astype(jnp.float32) / jnp.sqrt(a), acc, updates)
        return _cast_like(steps, updates), optax.ScaleByRssState(sum_of_squares=acc)

    return optax.GradientTransformation(init_fn, update_fn)


class AdagradDecayState(NamedTuple):
    """Global step, the shared decay power of the dense variables, and the accumulators."""

    count: jax.Array
    power: jax.Array
    accumulator: optax.Updates


def _decayed(acc: jax.Array, times: jax.Array, rate: float) -> jax.Array:
    """`times` applications of acc = max(acc * rate, 0.1), i.e. max(acc * rate^times, 0.1)."""
    return jnp.where(times > 0, jnp.maximum(acc * rate ** times.astype(jnp.float32), ADAGRAD_INITIAL_ACCUMULATOR), acc)


def adagrad_decay(learning_rate: float, decay_step: int = 100_000, decay_rate: float = 0.9
                  ) -> optax.GradientTransformation:
    """DeepRec AdagradDecayOptimizer (docs/docs_en/AdagradDecay-Optimizer.md).

    With gs = global_step + 1: if gs // decay_step > power then acc = max(acc * decay_rate, 0.1) and
    power += 1; then acc += g^2 and w -= lr g / sqrt(acc). acc starts at 0.1; dense variables share
    one power counter.
    """

    def init_fn(params):
        acc = jax.tree.map(lambda p: jnp.full(p.shape, ADAGRAD_INITIAL_ACCUMULATOR, jnp.float32), params)
        return AdagradDecayState(jnp.zeros([], jnp.int32), jnp.zeros([], jnp.int32), acc)

    def update_fn(updates, state, params=None):
        del params
        gs = state.count + 1
        decay = (gs // decay_step > state.power).astype(jnp.int32)
        acc = jax.tree.map(lambda a, g: _decayed(a, decay, decay_rate) + jnp.square(g.astype(jnp.float32)),
                           state.accumulator, updates)
        steps = jax.tree.map(lambda a, g: -learning_rate * g.astype(jnp.float32) / jnp.sqrt(a), acc, updates)
        return _cast_like(steps, updates), AdagradDecayState(gs, state.power + decay, acc)

    return optax.GradientTransformation(init_fn, update_fn)


# ------------------------------------------------------------------------------ row-wise rules
class RowRule(NamedTuple):
    """How one embedding table's touched rows are updated.

    init(table) -> (row_slots, table_slots): row_slots are arrays with the table's leading dimension
    (gathered and scattered with the rows), table_slots are per-table scalars.
    update(rows [N, E], grads [N, E], row_slots (gathered), table_slots, step) ->
    (new rows, new row_slots, new table_slots); `step` is the global step before this update.
    """

    init: Callable[[jax.Array], tuple[dict[str, jax.Array], dict[str, jax.Array]]]
    update: Callable[..., tuple[jax.Array, dict[str, jax.Array], dict[str, jax.Array]]]


def adam_rows(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
              lazy_beta_powers: bool = False) -> RowRule:
    """Lazy Adam on touched rows (TF LazyAdam, DeepRec AdamAsync): untouched rows' moments do not decay.

    Bias correction uses the global step (adam) or the table's own beta powers (adamasync); in DIN
    every table is updated every step, so both give lr_t of TF1 Adam.
    """

    def init(table):
        shape = table.shape
        table_slots = {"beta1_power": jnp.ones([], jnp.float32), "beta2_power": jnp.ones([], jnp.float32)} \
            if lazy_beta_powers else {}
        return {"m": jnp.zeros(shape, jnp.float32), "v": jnp.zeros(shape, jnp.float32)}, table_slots

    def update(rows, grads, slots, table_slots, step):
        g = grads.astype(jnp.float32)
        m = b1 * slots["m"] + (1 - b1) * g
        v = b2 * slots["v"] + (1 - b2) * jnp.square(g)
        if lazy_beta_powers:
            p1, p2 = table_slots["beta1_power"] * b1, table_slots["beta2_power"] * b2
            table_slots = {"beta1_power": p1, "beta2_power": p2}
        else:
            t = (step + 1).astype(jnp.float32)
            p1, p2 = b1**t, b2**t
        lr_t = learning_rate * jnp.sqrt(1 - p2) / (1 - p1)
        new_rows = (rows.astype(jnp.float32) - lr_t * m / (jnp.sqrt(v) + eps)).astype(rows.dtype)
        return new_rows, {"m": m, "v": v}, table_slots

    return RowRule(init, update)


def adagrad_rows(learning_rate: float) -> RowRule:
    """TF1 Adagrad on touched rows: acc_r += g_r^2; w_r -= lr g_r / sqrt(acc_r) (exact for every row)."""

    def init(table):
        return {"acc": jnp.full(table.shape, ADAGRAD_INITIAL_ACCUMULATOR, jnp.float32)}, {}

    def update(rows, grads, slots, table_slots, step):
        g = grads.astype(jnp.float32)
        acc = slots["acc"] + jnp.square(g)
        return (rows.astype(jnp.float32) - learning_rate * g / jnp.sqrt(acc)).astype(rows.dtype), {"acc": acc}, table_slots

    return RowRule(init, update)


def adagrad_decay_rows(learning_rate: float, decay_step: int = 100_000, decay_rate: float = 0.9) -> RowRule:
    """AdagradDecay on touched rows, each row with its own decay power.

    A row touched at gs = step + 1 first applies every decay it missed, k = gs // decay_step - power_r
    times: acc_r = max(acc_r * decay_rate^k, 0.1) (what the dense rule did meanwhile, as the
    intermediate max(., 0.1) cannot bind earlier than the last one); then the Adagrad update.
    """

    def init(table):
        return {"acc": jnp.full(table.shape, ADAGRAD_INITIAL_ACCUMULATOR, jnp.float32),
                "power": jnp.zeros(table.shape[:1], jnp.int32)}, {}

    def update(rows, grads, slots, table_slots, step):
        gs = step + 1
        target = gs // decay_step
        missed = jnp.maximum(target - slots["power"], 0)
        g = grads.astype(jnp.float32)
        acc = _decayed(slots["acc"], missed[:, None], decay_rate) + jnp.square(g)
        new_rows = (rows.astype(jnp.float32) - learning_rate * g / jnp.sqrt(acc)).astype(rows.dtype)
        return new_rows, {"acc": acc, "power": jnp.maximum(slots["power"], target)}, table_slots

    return RowRule(init, update)


class Optimizer(NamedTuple):
    """A configured optimizer: `dense` for dense tensors (clip included), `rows` for embedding rows."""

    dense: optax.GradientTransformation
    rows: RowRule
    clip_norm: float


def create_optimizer(name: str, learning_rate: float, clip_norm: float = 5.0, *,
                     decay_step: int = 100_000, decay_rate: float = 0.9) -> Optimizer:
    """The seed's --optimizer choice with DeepRec's per-tensor clipping in front of the dense rule."""
    rules: dict[str, tuple[Callable[[], optax.GradientTransformation], Callable[[], RowRule]]] = {
        "adam": (lambda: tf_adam(learning_rate), lambda: adam_rows(learning_rate)),
        "adamasync": (lambda: adam_async(learning_rate), lambda: adam_rows(learning_rate, lazy_beta_powers=True)),
        "adagrad": (lambda: tf_adagrad(learning_rate), lambda: adagrad_rows(learning_rate)),
        "adagraddecay": (lambda: adagrad_decay(learning_rate, decay_step, decay_rate),
                         lambda: adagrad_decay_rows(learning_rate, decay_step, decay_rate)),
    }
    if name not in rules:
        raise ValueError(f"config.optimizer={name!r} is not known; choose one of {', '.join(OPTIMIZERS)}")
    dense, rows = rules[name]
    return Optimizer(optax.chain(clip_by_norm_per_tensor(clip_norm), dense()), rows(), clip_norm)

