"""The closed-form catch-up of untouched rows (din_jax/adam_catchup.py) against TF1 Adam run step by step."""

from __future__ import annotations

import numpy as np
import jax.numpy as jnp
import pytest

from din_jax import adam_catchup

LR, B1, B2, EPS = 1e-3, 0.9, 0.999, 1e-8


def stepwise_float64(w, m, v, last, through):
    """TF1 Adam with gradient 0 from step last+1 to through, one step at a time, in float64 with TF's float32
    hyperparameters (beta1 is float32 0.9, i.e. 0.89999998: over 3,000 steps that alone moves b1^k by 1e-4)."""
    lr, b1, b2, eps = (float(np.float32(x)) for x in (LR, B1, B2, EPS))
    w, m, v = (np.asarray(a, np.float64).copy() for a in (w, m, v))
    for t in range(last + 1, through + 1):
        m *= b1
        v *= b2
        w -= lr * np.sqrt(1 - b2**t) / (1 - b1**t) * m / (np.sqrt(v) + eps)
    return w, m, v


def rows(seed, n=48, e=6):
    """Rows, and moments as Adam leaves them: |m| below sqrt(v) / sqrt(1 - b2) * (1 - b1); some rows never touched."""
    rng = np.random.default_rng(seed)
    v = (10.0 ** rng.uniform(-16, -3, (n, e))).astype(np.float32)
    m = (rng.uniform(-1, 1, (n, e)) * np.sqrt(v) * 3).astype(np.float32)
    m[0], v[0] = 0, 0
    return rng.normal(0, 0.05, (n, e)).astype(np.float32), m, v


@pytest.mark.parametrize("last, through", [(0, 0), (0, 1), (3, 4), (0, 7), (10, 160), (2, 300), (250, 4000),
                                           (20_000, 20_150), (5, 30_000)])
def test_catch_up_equals_adam_stepped_with_zero_gradients(last, through):
    w, m, v = rows(last + through)
    got = adam_catchup.catch_up(jnp.asarray(w), jnp.asarray(m), jnp.asarray(v), jnp.full(len(w), last, jnp.int32),
                                jnp.int32(through), lr=LR, b1=B1, b2=B2, eps=EPS)
    want = stepwise_float64(w, m, v, last, through)
    moved = np.abs(want[0] - w).max()
    # Float32 rounding: 1 - b2^t alone is off by ~1e-5 relative at the first steps; later, a few ulp.
    assert np.abs(np.asarray(got[0], np.float64) - want[0]).max() <= 2e-5 * moved + 1e-9
    np.testing.assert_allclose(got[1], want[1], rtol=1e-5, atol=1e-38)
    np.testing.assert_allclose(got[2], want[2], rtol=1e-5, atol=1e-38)
    if last == through:
        assert all(np.array_equal(np.asarray(g), a) for g, a in zip(got, (w, m, v)))


def test_rows_idle_for_different_spans_catch_up_each_to_its_own_span():
    w, m, v = rows(7, n=6)
    last = np.array([0, 40, 100, 399, 400, 150], np.int32)
    got = adam_catchup.catch_up(jnp.asarray(w), jnp.asarray(m), jnp.asarray(v), jnp.asarray(last), jnp.int32(400),
                                lr=LR, b1=B1, b2=B2, eps=EPS)
    for row in range(6):
        want = stepwise_float64(w[row:row + 1], m[row:row + 1], v[row:row + 1], int(last[row]), 400)
        moved = np.abs(want[0] - w[row]).max()
        assert np.abs(np.asarray(got[0][row], np.float64) - want[0][0]).max() <= 2e-5 * moved + 1e-9


def test_horizon_is_where_the_terms_fall_below_float32():
    k = adam_catchup.horizon(B1, B2)
    assert (B1 / np.sqrt(B2)) ** k < 2.0**-30 < (B1 / np.sqrt(B2)) ** (k - 1)
    with pytest.raises(ValueError, match="b1 < sqrt"):
        adam_catchup.horizon(0.999, 0.99)
