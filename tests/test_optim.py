"""Optimizer rules against numpy implementations of TF1's update equations."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from din_jax.optim import clip_by_norm_per_tensor, create_optimizer, tf_adagrad, tf_adam


def gradient_stream(steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    return [{"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=(2,)).astype(np.float32)}
            for _ in range(steps)]


def run(tx, params, grads):
    state = tx.init(params)
    for g in grads:
        updates, state = tx.update(g, state, params)
        params = optax.apply_updates(params, updates)
    return params


def test_tf_adam_matches_tf1_rule_with_epsilon_outside_bias_correction():
    params = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    grads = gradient_stream(5)
    got = run(tf_adam(0.01, eps=1e-3), params, grads)
    for name in params:
        w, m, v = params[name].astype(np.float64), 0.0, 0.0
        for t, g in enumerate(grads, start=1):
            m = 0.9 * m + 0.1 * g[name]
            v = 0.999 * v + 0.001 * g[name] ** 2
            lr_t = 0.01 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
            w = w - lr_t * m / (np.sqrt(v) + 1e-3)
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-6)
    # Large eps makes the placement of epsilon visible: optax.adam puts it inside the bias correction.
    optax_result = run(optax.adam(0.01, eps=1e-3), params, grads)
    assert not np.allclose(optax_result["w"], got["w"], rtol=1e-4)


def test_tf_adagrad_starts_accumulator_at_point_one():
    params = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    grads = gradient_stream(4, seed=1)
    got = run(tf_adagrad(0.1), params, grads)
    for name in params:
        w, acc = params[name].astype(np.float64), np.full(params[name].shape, 0.1)
        for g in grads:
            acc = acc + g[name] ** 2
            w = w - 0.1 * g[name] / np.sqrt(acc)
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-6)


def test_clip_by_norm_is_per_tensor_like_tf():
    grads = {"big": jnp.array([30.0, 40.0]), "small": jnp.array([0.3, 0.4])}
    clipped, _ = clip_by_norm_per_tensor(5.0).update(grads, optax.EmptyState())
    np.testing.assert_allclose(clipped["big"], [3.0, 4.0], rtol=1e-6)      # norm 50 -> 5
    np.testing.assert_allclose(clipped["small"], [0.3, 0.4], rtol=1e-6)    # norm 0.5 untouched


def test_create_optimizer_clips_before_the_rule():
    params = {"w": np.zeros(2, np.float32)}
    grads = [{"w": np.array([300.0, 400.0], np.float32)}]
    got = run(create_optimizer("adagrad", 1.0).dense, params, grads)
    g = np.array([3.0, 4.0])
    np.testing.assert_allclose(got["w"], -g / np.sqrt(0.1 + g**2), rtol=1e-6)


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="config.optimizer=.sgd. is not known; choose one of adam, adamasync"):
        create_optimizer("sgd", 0.1)


# ----------------------------------------------------------------------------- row-wise rules
from din_jax.optim import adagrad_decay, adagrad_decay_rows, adagrad_rows, adam_async, adam_rows  # noqa: E402

V, E = 6, 3
# Rows touched per step: row 5 never, row 0 every step, the others sometimes (skipped steps matter).
TOUCHED = [[0, 1, 2], [0, 3], [0, 1, 4], [0], [0, 2, 3, 4], [0, 1]]


def row_stream(seed=0):
    rng = np.random.default_rng(seed)
    return [(np.array(ids), rng.normal(size=(len(ids), E)).astype(np.float32)) for ids in TOUCHED]


def apply_rows(rule, table, stream):
    row_slots, table_slots = rule.init(jnp.asarray(table))
    table = jnp.asarray(table)
    for step, (ids, grads) in enumerate(stream):
        slots = {k: v[ids] for k, v in row_slots.items()}
        rows, slots, table_slots = rule.update(table[ids], jnp.asarray(grads), slots, table_slots, jnp.int32(step))
        table = table.at[ids].set(rows)
        row_slots = {k: v.at[ids].set(slots[k]) for k, v in row_slots.items()}
    return np.asarray(table)


def apply_dense(tx, table, stream):
    """The stream applied by a dense transformation: untouched rows get gradient 0."""
    params = {"t": jnp.asarray(table)}
    state = tx.init(params)
    for ids, grads in stream:
        dense_g = np.zeros((V, E), np.float32)
        dense_g[ids] = grads
        updates, state = tx.update({"t": jnp.asarray(dense_g)}, state)
        params = optax.apply_updates(params, updates)
    return np.asarray(params["t"])


def test_lazy_adam_rows_match_numpy_rule_with_skipped_rows():
    table = np.random.default_rng(3).normal(size=(V, E)).astype(np.float32)
    stream = row_stream()
    want = table.astype(np.float64).copy()
    m, v = np.zeros_like(want), np.zeros_like(want)
    for t, (ids, g) in enumerate(stream, start=1):
        m[ids] = 0.9 * m[ids] + 0.1 * g           # untouched rows: moments frozen (lazy)
        v[ids] = 0.999 * v[ids] + 0.001 * g**2
        lr_t = 0.01 * np.sqrt(1 - 0.999**t) / (1 - 0.9**t)
        want[ids] -= lr_t * m[ids] / (np.sqrt(v[ids]) + 1e-8)
    for lazy_powers in (False, True):  # global step vs per-table beta powers: equal when updated every step
        np.testing.assert_allclose(apply_rows(adam_rows(0.01, lazy_beta_powers=lazy_powers), table, stream), want,
                                   rtol=1e-5, atol=1e-6)
    assert np.array_equal(apply_rows(adam_rows(0.01), table, stream)[5], table[5])


def test_adagrad_decay_matches_deeprec_rule_with_skipped_rows():
    """Dense reference: every row decays at boundaries (gs // 2 > power) even when its gradient is 0."""
    table = np.random.default_rng(4).normal(size=(V, E)).astype(np.float32)
    stream = row_stream(1)
    want = table.astype(np.float64).copy()
    acc, power = np.full_like(want, 0.1), 0
    for step, (ids, g) in enumerate(stream):
        gs = step + 1
        if gs // 2 > power:
            acc = np.maximum(acc * 0.5, 0.1)
            power += 1
        dense_g = np.zeros_like(want)
        dense_g[ids] = g
        acc += dense_g**2
        want -= 0.1 * dense_g / np.sqrt(acc)
    np.testing.assert_allclose(apply_rows(adagrad_decay_rows(0.1, 2, 0.5), table, stream), want, rtol=1e-5, atol=1e-6)
    # The dense optax transformation computes the same thing over whole tensors.
    np.testing.assert_allclose(apply_dense(adagrad_decay(0.1, 2, 0.5), table, stream), want, rtol=1e-5, atol=1e-6)


def test_adagrad_decay_accumulator_floor_and_catch_up():
    """A row away for several decay periods catches up all missed decays: max(acc * r^k, 0.1)."""
    rule = adagrad_decay_rows(1.0, decay_step=1, decay_rate=0.5)
    slots = {"acc": jnp.array([[100.0], [0.15]]), "power": jnp.array([0, 0], jnp.int32)}
    _, new, _ = rule.update(jnp.zeros((2, 1)), jnp.zeros((2, 1)), slots, {}, jnp.int32(2))  # gs = 3: k = 3
    np.testing.assert_allclose(new["acc"][:, 0], [12.5, 0.1])
    np.testing.assert_array_equal(new["power"], [3, 3])


def test_adagrad_rows_equal_dense_adagrad_for_every_row():
    table = np.random.default_rng(5).normal(size=(V, E)).astype(np.float32)
    stream = row_stream(2)
    got = apply_rows(adagrad_rows(0.1), table, stream)
    np.testing.assert_allclose(got, apply_dense(tf_adagrad(0.1), table, stream), rtol=1e-6, atol=1e-7)


def test_adam_async_keeps_beta_powers_per_variable():
    params = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    grads = gradient_stream(4, seed=2)
    got = run(adam_async(0.01), params, grads)
    want = run(tf_adam(0.01), params, grads)  # every variable updated every step: same numbers
    for name in params:  # b^t as a running product vs a power: float32 rounding in 1 - b^t only
        np.testing.assert_allclose(got[name], want[name], rtol=1e-4)
    state = adam_async(0.01).init(params)
    assert set(state.beta1_power) == {"w", "b"}
