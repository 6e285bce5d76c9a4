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
    got = run(create_optimizer("adagrad", 1.0), params, grads)
    g = np.array([3.0, 4.0])
    np.testing.assert_allclose(got["w"], -g / np.sqrt(0.1 + g**2), rtol=1e-6)


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError, match="config.optimizer='sgd' is not known; choose one of adam, adagrad"):
        create_optimizer("sgd", 0.1)
