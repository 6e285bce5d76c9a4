"""DIN's math against an independent numpy forward pass written from DeepRec's graph."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from din_jax.model import DIN

VOCAB = {"uid": 7, "mid": 11, "cat": 5}
B, T = 4, 6


def random_batch(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = np.array([0, 1, 3, T])  # empty, short, partial and full histories
    mask = np.arange(T)[None, :] < lengths[:, None]
    return {
        "uid": rng.integers(0, VOCAB["uid"], B).astype(np.int32),
        "mid": rng.integers(0, VOCAB["mid"], B).astype(np.int32),
        "cat": rng.integers(0, VOCAB["cat"], B).astype(np.int32),
        "hist_mids": np.where(mask, rng.integers(1, VOCAB["mid"], (B, T)), 0).astype(np.int32),
        "hist_cats": np.where(mask, rng.integers(1, VOCAB["cat"], (B, T)), 0).astype(np.int32),
        "hist_mask": mask,
        "label": rng.integers(0, 2, B).astype(np.float32),
        "weight": np.ones(B, np.float32),
    }


def perturbed_params(model: DIN, batch, seed: int = 1):
    """Initialised params plus noise, so biases, PReLU alphas and BN gamma/beta are not trivial."""
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
    noisy = [leaf + 0.3 * jax.random.normal(k, leaf.shape) for leaf, k in zip(leaves, keys)]
    return jax.tree.unflatten(treedef, noisy)


def numpy_din(p, batch, attention="softmax"):
    """DeepRec's DIN forward pass in numpy: returns (logits [B], attention weights [B, T])."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), p)
    sigmoid = lambda x: 1 / (1 + np.exp(-x))  # noqa: E731
    dense = lambda x, layer: x @ layer["kernel"] + layer["bias"]  # noqa: E731
    mask = batch["hist_mask"]
    uid = p["uid_table"][batch["uid"]]
    item = np.concatenate([p["mid_table"][batch["mid"]], p["cat_table"][batch["cat"]]], -1)
    hist = np.concatenate([p["mid_table"][batch["hist_mids"]], p["cat_table"][batch["hist_cats"]]], -1)
    hist = hist * mask[..., None]
    hist_sum = hist.sum(1)

    att = p["attention_unit"]
    q = dense(item, att["query"])
    alpha = att["query_prelu"]["alpha"]
    q = np.maximum(0, q) + alpha * np.minimum(0, q)
    qs = np.repeat(q[:, None, :], T, axis=1)
    x = np.concatenate([qs, hist, qs - hist, qs * hist], -1)
    x = sigmoid(dense(x, att["att_0"]))
    x = sigmoid(dense(x, att["att_1"]))
    scores = dense(x, att["att_out"])[..., 0]
    if attention == "softmax":
        scores = np.where(mask, scores, -(2.0**32) + 1)
        e = np.exp(scores - scores.max(-1, keepdims=True))
        weights = e / e.sum(-1, keepdims=True)
    else:
        weights = np.where(mask, scores, 0.0)
    attended = np.einsum("bt,btd->bd", weights, hist)
    weights = np.where(mask, weights, 0.0)  # reported weights: 0 on padding, also for an empty history

    top = np.concatenate([uid, item, hist_sum, item * hist_sum, attended], -1)
    assert top.shape == (B, 162)
    top = p["bn"]["scale"] * (top - 0.0) / np.sqrt(1.0 + 1e-3) + p["bn"]["bias"]  # moving mean 0, var 1
    top = np.maximum(0, dense(top, p["hidden_layers_0"]))
    top = np.maximum(0, dense(top, p["hidden_layers_1"]))
    logits = dense(dense(top, p["pre_logit"]), p["logit"])[:, 0]
    return logits, weights


@pytest.mark.parametrize("attention", ["softmax", "unnormalized"])
def test_forward_matches_numpy_deeprec_graph(attention):
    batch = random_batch()
    model = DIN(vocab_sizes=VOCAB, attention=attention)
    params = perturbed_params(model, batch)
    logits, weights = model.apply({"params": params}, batch)
    want_logits, want_weights = numpy_din(params, batch, attention)
    np.testing.assert_allclose(weights, want_weights, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["softmax", "unnormalized", "mean", "none"])
def test_packed_and_grid_histories_give_the_reference_logits_and_equal_gradients(attention):
    """A packed batch (segment operations) and the same batch unpacked (the [B, T] grid's reshapes) agree."""
    from din_jax.packing import pack_history
    from din_jax.steps import weighted_sigmoid_cross_entropy
    grid = random_batch()
    packed = pack_history(grid, granularity=4, floor=16)  # 10 real positions padded to 16
    model = DIN(vocab_sizes=VOCAB, attention=attention)
    params = perturbed_params(model, grid)

    def loss(p, batch):
        logits, _ = model.apply({"params": p}, batch)
        return weighted_sigmoid_cross_entropy(logits, batch["label"], batch["weight"]), logits

    gradient = jax.jit(jax.value_and_grad(loss, has_aux=True))  # one program, not hundreds compiled op by op
    (_, grid_logits), grid_grads = gradient(params, grid)
    (_, packed_logits), packed_grads = gradient(params, packed)
    if attention in ("softmax", "unnormalized"):
        np.testing.assert_allclose(grid_logits, numpy_din(params, grid, attention)[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(packed_logits, grid_logits, rtol=1e-6, atol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), packed_grads, grid_grads)


def test_attention_ignores_padded_positions():
    batch = random_batch()
    model = DIN(vocab_sizes=VOCAB)
    params = perturbed_params(model, batch)
    logits, weights = model.apply({"params": params}, batch)
    mask = batch["hist_mask"]
    assert np.all(np.asarray(weights)[~mask] == 0.0)
    np.testing.assert_allclose(np.asarray(weights)[1:].sum(-1), 1.0, rtol=1e-6)  # rows with a real history
    changed = dict(batch, hist_mids=np.where(mask, batch["hist_mids"], 9), hist_cats=np.where(mask, batch["hist_cats"], 3))
    logits_changed, _ = model.apply({"params": params}, changed)
    np.testing.assert_array_equal(logits, logits_changed)


def test_frozen_batch_norm_uses_initial_moving_statistics():
    batch = random_batch()
    model = DIN(vocab_sizes=VOCAB)
    variables = model.init(jax.random.PRNGKey(0), batch)
    assert "batch_stats" not in variables  # nothing but gamma and beta, and they learn
    # Train and eval mode give the same output: batch statistics never enter.
    out_train, _ = model.apply(variables, batch, train=True)
    out_eval, _ = model.apply(variables, batch, train=False)
    np.testing.assert_array_equal(out_train, out_eval)
    # Scaling the batch's other rows does not change row 0 (no batch statistics).
    other = dict(batch, uid=np.array([batch["uid"][0], 1, 2, 3], np.int32))
    np.testing.assert_array_equal(model.apply(variables, other)[0][0], out_eval[0])


def test_batch_statistics_option_updates_moving_averages_and_skips_padding():
    batch = random_batch()
    model = DIN(vocab_sizes=VOCAB, batch_norm="batch")
    variables = model.init(jax.random.PRNGKey(0), batch)
    _, updates = model.apply(variables, batch, train=True, mutable=["batch_stats"])
    assert not np.allclose(updates["batch_stats"]["bn"]["mean"], 0.0)
    padded = {k: np.concatenate([v, v[:1]]) for k, v in batch.items()}
    padded["weight"][-1] = 0.0
    padded["uid"][-1] = 6
    _, updates_padded = model.apply(variables, padded, train=True, mutable=["batch_stats"])
    np.testing.assert_allclose(updates_padded["batch_stats"]["bn"]["mean"], updates["batch_stats"]["bn"]["mean"],
                               rtol=1e-5, atol=1e-7)


def test_initialisation_follows_tf1_defaults():
    model = DIN(vocab_sizes={"uid": 4000, "mid": 3000, "cat": 50})
    params = model.init(jax.random.PRNGKey(0), random_batch())["params"]
    uid = np.asarray(params["uid_table"])
    # truncated_normal(stddev=1/sqrt(18)) without variance correction: |x| <= 2 sigma, std ~ 0.88 sigma.
    sigma = 18**-0.5
    assert np.abs(uid).max() <= 2 * sigma + 1e-6
    assert abs(uid.std() / sigma - 0.8796) < 0.01
    mid = np.asarray(params["mid_table"])  # glorot uniform: U(-sqrt(6/(3000+18)), +)
    limit = np.sqrt(6 / (3000 + 18))
    assert np.abs(mid).max() <= limit and np.abs(mid).max() > 0.95 * limit
    kernel = np.asarray(params["hidden_layers_0"]["kernel"])
    assert kernel.shape == (162, 200)
    assert np.abs(kernel).max() <= np.sqrt(6 / (162 + 200))
    assert np.all(np.asarray(params["hidden_layers_0"]["bias"]) == 0)
    assert np.all(np.asarray(params["attention_unit"]["query_prelu"]["alpha"]) == 0.1)
    assert np.all(np.asarray(params["bn"]["scale"]) == 1) and np.all(np.asarray(params["bn"]["bias"]) == 0)


def test_mean_attention_is_uniform_over_real_history():
    batch = random_batch()
    model = DIN(vocab_sizes=VOCAB, attention="mean")
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    assert "att_0" not in params.get("attention_unit", {})
    _, weights = model.apply({"params": params}, batch)
    lengths = batch["hist_mask"].sum(-1)
    for row, n in enumerate(lengths):
        expected = np.where(np.arange(T) < n, 1.0 / max(n, 1), 0.0)
        np.testing.assert_allclose(weights[row], expected, rtol=1e-6)


def test_dice_matches_dien_formula():
    batch = random_batch()
    model = DIN(vocab_sizes=VOCAB, activation="dice")
    params = perturbed_params(model, batch)
    logits, _ = model.apply({"params": params}, batch)
    # Recompute the top MLP in numpy from the BN output, with Dice on the hidden layers.
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    _, state = model.apply({"params": params}, batch, capture_intermediates=lambda m, name: m.name == "bn",
                           mutable=["intermediates"])
    x = np.asarray(state["intermediates"]["bn"]["__call__"][0], np.float64)
    for i in range(2):
        layer = p[f"hidden_layers_{i}"]
        h = x @ layer["kernel"] + layer["bias"]
        mean = h.mean(0)
        std = np.sqrt(((h - mean) ** 2 + 1e-9).mean(0))
        prob = 1 / (1 + np.exp(-(h - mean) / (std + 1e-9)))
        x = p[f"dice_{i}"]["alpha"] * (1 - prob) * h + prob * h
    want = (x @ p["pre_logit"]["kernel"] + p["pre_logit"]["bias"]) @ p["logit"]["kernel"] + p["logit"]["bias"]
    np.testing.assert_allclose(logits, want[:, 0], rtol=1e-5, atol=1e-5)


def test_unpacked_history_segments_are_unsorted_and_no_segment_op_promises_sorted_ids():
    """Masked positions between real ones get id B: a sorted-indices promise would be false (wrong on GPU)."""
    from din_jax.model import history_positions
    batch = random_batch()
    _, segment = history_positions(batch)
    assert np.any(np.diff(np.asarray(segment)) < 0)
    model = DIN(vocab_sizes=VOCAB)
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    jaxpr = jax.make_jaxpr(lambda p: model.apply({"params": p}, batch))(params)

    def promised(eqns):
        for eqn in eqns:
            yield eqn.params.get("indices_are_sorted", False)
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", None)
                if inner is not None and hasattr(inner, "eqns"):
                    yield from promised(inner.eqns)
    assert not any(promised(jaxpr.jaxpr.eqns))
