"""Optimizer rules against numpy implementations of TF1's update equations."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from din_jax.optim import clip_by_norm_per_tensor, create_optimizer, exact_adam_rows, tf_adagrad, tf_adam


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
    with pytest.raises(ValueError, match="config.optimizer=.sgd. is not known; choose one of adam, lazyadam, adamasync"):
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


def deeprec_sparse_apply_adagrad_decay(var, acc, power, ids, grads, global_step, lr, decay_step, rate, baseline=0.1):
    """numpy transcription of SparseApplyAdagradDecayOp (DeepRec training_ali_ops.cc), row by row, in place."""
    for i, row in enumerate(ids):
        if global_step // decay_step > power[row]:
            acc[row] = np.maximum(acc[row] * rate, baseline)
            power[row] += 1
        acc[row] += grads[i] ** 2
        var[row] -= lr * grads[i] / np.sqrt(acc[row])


def deeprec_apply_adagrad_decay(var, acc, power, grad, global_step, lr, decay_step, rate, baseline=0.1):
    """numpy transcription of ApplyAdagradDecayOp: one power per variable (power[0]), whole tensor, in place."""
    if global_step // decay_step > power[0]:
        acc[...] = np.maximum(acc * rate, baseline)
        power[0] += 1
    acc += grad**2
    var -= lr * grad / np.sqrt(acc)


def test_adagrad_decay_rows_match_deeprec_sparse_kernel_with_skipped_rows():
    """Both paths run the sparse kernel on a table: rows decay only when touched, one decay per touch."""
    table = np.random.default_rng(4).normal(size=(V, E)).astype(np.float32)
    stream = row_stream(1)
    want = table.astype(np.float64)
    acc, power = np.full_like(want, 0.1), np.zeros(V, np.int64)
    for step, (ids, g) in enumerate(stream):  # global_step_on_worker = global_step + 1
        deeprec_sparse_apply_adagrad_decay(want, acc, power, ids, g, step + 1, 0.1, decay_step=2, rate=0.5)
    np.testing.assert_allclose(apply_rows(adagrad_decay_rows(0.1, 2, 0.5), table, stream), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(apply_dense(adagrad_decay(0.1, 2, 0.5, tables=("t",)), table, stream), want,
                               rtol=1e-5, atol=1e-6)
    assert list(power) == [3, 2, 1, 2, 2, 0]  # row 0: every step; row 5: never touched
    # The dense kernel on the same table (every row decays at every boundary) is a different rule.
    assert not np.allclose(apply_dense(adagrad_decay(0.1, 2, 0.5), table, stream), want, rtol=1e-4)


def test_adagrad_decay_dense_kernel_keeps_one_power_per_variable():
    params = {"w": np.ones((3, 2), np.float32), "b": np.zeros(2, np.float32)}
    grads = gradient_stream(7, seed=3)
    grads[4] = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(2, np.float32)}  # a boundary with gradient 0
    tx = adagrad_decay(0.1, decay_step=2, decay_rate=0.5)
    got = run(tx, params, grads)
    for name in params:
        w, acc, power = params[name].astype(np.float64), np.full(params[name].shape, 0.1), [0]
        for step, g in enumerate(grads):
            deeprec_apply_adagrad_decay(w, acc, power, g[name], step + 1, 0.1, decay_step=2, rate=0.5)
        np.testing.assert_allclose(got[name], w, rtol=1e-5, atol=1e-6)
    state = tx.init(params)
    assert {name: p.shape for name, p in state.power.items()} == {"w": (), "b": ()}


def test_adagrad_decay_uses_the_global_step_after_this_update():
    """gs = global_step + 1: with decay_step 2 the second update (global_step 1) already decays."""
    tx = adagrad_decay(1.0, decay_step=2, decay_rate=0.5)
    state = tx.init({"w": jnp.zeros(1)})
    for _ in range(2):
        _, state = tx.update({"w": jnp.ones(1)}, state)
    np.testing.assert_allclose(state.accumulator["w"], [1.55])  # max(1.1 * 0.5, 0.1) + 1; 2.1 if gs were 1
    assert int(state.power["w"]) == 1


def test_adagrad_decay_row_away_for_several_periods_decays_once_per_touch():
    """DeepRec decays a touched row at most once: acc 100 at power 0, touched at gs = 3 (decay_step 1)
    becomes 50 (not 100 * 0.5^3 = 12.5), power 1; it catches up one period per further touch."""
    rule = adagrad_decay_rows(1.0, decay_step=1, decay_rate=0.5)
    slots = {"acc": jnp.array([[100.0], [0.15]]), "power": jnp.array([0, 0], jnp.int32)}
    for acc, power in [(50.0, 1), (25.0, 2), (12.5, 3), (12.5, 3)]:  # touches within global step 2 (gs = 3)
        _, slots, _ = rule.update(jnp.zeros((2, 1)), jnp.zeros((2, 1)), slots, {}, jnp.int32(2))
        np.testing.assert_allclose(slots["acc"][:, 0], [acc, 0.1])  # 0.15 * 0.5 is floored at 0.1
        np.testing.assert_array_equal(slots["power"], [power, power])
    rows, slots, _ = rule.update(jnp.zeros((1, 1)), jnp.ones((1, 1)), {"acc": jnp.array([[100.0]]),
                                 "power": jnp.array([0], jnp.int32)}, {}, jnp.int32(2))
    np.testing.assert_allclose(slots["acc"], [[51.0]])  # decay first, then + g^2
    np.testing.assert_allclose(rows, [[-1 / np.sqrt(51.0)]], rtol=1e-6)


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


# ------------------------------------------------------------------------------------------ exact Adam on rows
def zipf_row_stream(steps: int, rows: int, width: int, seed: int):
    """Per step, (touched rows, their gradients): a steep power law, so some rows are touched every step, the
    tail once in tens to hundreds of steps, and the last rows never."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, rows + 1) ** 1.6
    p[-4:] = 0
    for _ in range(steps):
        touched = np.unique(rng.choice(rows, 12, p=p / p.sum()))
        yield touched.astype(np.int32), rng.normal(0, 1e-2, (len(touched), width)).astype(np.float32)


class Float64Adam:
    """TF1 Adam on a whole table in float64 (with TF's float32 hyperparameters)."""

    def __init__(self, w: np.ndarray, lr: float):
        self.w, self.m, self.v, self.t = w, np.zeros_like(w), np.zeros_like(w), 0
        self.lr, self.b1, self.b2, self.eps = (float(np.float32(x)) for x in (lr, 0.9, 0.999, 1e-8))

    def step(self, g):
        g = np.asarray(g, np.float64)
        self.t += 1
        self.m = self.b1 * self.m + (1 - self.b1) * g
        self.v = self.b2 * self.v + (1 - self.b2) * g * g
        lr_t = self.lr * np.sqrt(1 - self.b2**self.t) / (1 - self.b1**self.t)
        self.w = self.w - lr_t * self.m / (np.sqrt(self.v) + self.eps)


def test_exact_adam_rows_equal_tf1_adam_on_the_whole_table_over_hundreds_of_steps():
    rows, width, lr = 50, 5, 1e-3
    table = jnp.asarray(np.random.default_rng(0).normal(0, 0.1, (rows, width)).astype(np.float32))
    rule, dense = exact_adam_rows(lr), tf_adam(lr)
    sparse_table, (slots, table_slots) = table, rule.init(table)
    whole_table, whole_state = table, dense.init(table)
    update = jax.jit(rule.update)
    dense_update = jax.jit(dense.update)
    gaps = np.zeros(rows, int)
    last_seen = np.zeros(rows, int)
    exact = Float64Adam(np.asarray(table, np.float64), lr)  # what both float32 computations approximate
    for step, (touched, grads) in enumerate(zipf_row_stream(400, rows, width, seed=1)):
        gaps[touched] = np.maximum(gaps[touched], step - last_seen[touched])
        last_seen[touched] = step
        new_rows, new_slots, table_slots = update(sparse_table[touched], jnp.asarray(grads),
                                                  {k: v[touched] for k, v in slots.items()}, table_slots,
                                                  jnp.int32(step))
        sparse_table = sparse_table.at[touched].set(new_rows)
        slots = {k: slots[k].at[touched].set(new_slots[k]) for k in slots}
        full = jnp.zeros((rows, width), jnp.float32).at[touched].set(grads)
        steps, whole_state = dense_update(full, whole_state)
        whole_table = whole_table + steps
        exact.step(full)
    assert gaps.max() > 150 and (last_seen == 0).sum() >= 4  # rows away for long stretches, and never touched
    final, slots = rule.catch_up(sparse_table, slots, jnp.int32(400))
    # Float32 rounding: the whole-table rule rounds every row at every step, the catch-up once per span. Measured
    # here: both 4.2e-7 from the float64 rule (weights up to 0.25, whose float32 spacing is 3e-8), and 1.8e-7
    # from each other.
    error_whole = np.abs(np.asarray(whole_table, np.float64) - exact.w).max()
    error_exact = np.abs(np.asarray(final, np.float64) - exact.w).max()
    assert error_exact <= max(1.5 * error_whole, 1e-7), (error_exact, error_whole)
    np.testing.assert_allclose(final, whole_table, rtol=0, atol=4e-7)
    np.testing.assert_allclose(slots["m"], whole_state.mu, rtol=2e-5, atol=1e-30)
    np.testing.assert_allclose(slots["v"], whole_state.nu, rtol=2e-5, atol=1e-30)
    assert (np.asarray(slots["last"]) == 400).all()
    lazy_moved = np.abs(np.asarray(sparse_table) - np.asarray(whole_table)).max()
    assert lazy_moved > 1e-4  # before the catch-up the skipped rows lag: the catch-up is what makes them equal
