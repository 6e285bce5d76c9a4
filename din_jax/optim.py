"""Optimizers as optax GradientTransformations with DeepRec's (TF1's) update rules, and per-tensor clipping.

Every optimizer is `chain(clip_by_norm_per_tensor(5), <rule>)`: DeepRec's DIN clips each gradient
tensor to norm 5 (`tf.clip_by_norm`) before `apply_gradients`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ("adam", "adagrad")


def clip_by_norm_per_tensor(max_norm: float) -> optax.GradientTransformation:
    """tf.clip_by_norm on every leaf: g * max_norm / max(||g||_2, max_norm)."""

    def update_fn(updates, state, params=None):
        del params

        def clip(g):
            norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32))))
            return (g * (max_norm / jnp.maximum(norm, max_norm))).astype(g.dtype)

        return jax.tree.map(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


class TFAdamState(NamedTuple):
    """Step count and first/second moments, one pair per parameter."""

    count: jax.Array
    mu: optax.Updates
    nu: optax.Updates


def tf_adam(learning_rate: float, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> optax.GradientTransformation:
    """TF1 AdamOptimizer: lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t); w -= lr_t * m / (sqrt(v) + eps).

    Differs from optax.adam in where epsilon sits: TF1 adds it outside the bias correction
    (tensorflow/python/training/adam.py, Kingma & Ba section 2 "efficient version").
    """

    def init_fn(params):
        zeros = lambda p: jnp.zeros(p.shape, jnp.float32)  # noqa: E731 - moments in fp32 for any param dtype
        return TFAdamState(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

    def update_fn(updates, state, params=None):
        del params
        count = state.count + 1
        mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), state.mu, updates)
        nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)), state.nu, updates)
        t = count.astype(jnp.float32)
        lr_t = learning_rate * jnp.sqrt(1 - b2**t) / (1 - b1**t)
        new_updates = jax.tree.map(lambda m, v, g: (-lr_t * m / (jnp.sqrt(v) + eps)).astype(g.dtype), mu, nu, updates)
        return new_updates, TFAdamState(count, mu, nu)

    return optax.GradientTransformation(init_fn, update_fn)


def tf_adagrad(learning_rate: float, initial_accumulator_value: float = 0.1) -> optax.GradientTransformation:
    """TF1 AdagradOptimizer: acc += g^2; w -= lr * g / sqrt(acc), with acc starting at 0.1."""

    def init_fn(params):
        return optax.ScaleByRssState(
            sum_of_squares=jax.tree.map(lambda p: jnp.full(p.shape, initial_accumulator_value, jnp.float32), params))

    def update_fn(updates, state, params=None):
        del params
        acc = jax.tree.map(lambda a, g: a + jnp.square(g.astype(jnp.float32)), state.sum_of_squares, updates)
        new_updates = jax.tree.map(lambda a, g: (-learning_rate * g / jnp.sqrt(a)).astype(g.dtype), acc, updates)
        return new_updates, optax.ScaleByRssState(sum_of_squares=acc)

    return optax.GradientTransformation(init_fn, update_fn)


def create_optimizer(name: str, learning_rate: float, clip_norm: float = 5.0) -> optax.GradientTransformation:
    """The seed's --optimizer choice, with DeepRec's per-tensor clipping in front."""
    rules = {"adam": tf_adam, "adagrad": tf_adagrad}
    if name not in rules:
        raise ValueError(f"config.optimizer={name!r} is not known; choose one of {', '.join(OPTIMIZERS)}")
    return optax.chain(clip_by_norm_per_tensor(clip_norm), rules[name](learning_rate))
