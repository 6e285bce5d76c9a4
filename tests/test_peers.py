"""The peer ports in benchmarks/peers compute din_jax's DIN: same logits, gradients and optimizer rule.

Skipped where torch (or tensorflow) is not importable, as in the main venv; run them in .venv-bench
(`pip install -e '.[bench,test]'`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")

from benchmarks import books_shaped  # noqa: E402
from benchmarks.peers import torch_din  # noqa: E402
from configs import default  # noqa: E402
from din_jax import optim, steps, train  # noqa: E402
from input_pipeline import batches as batches_lib  # noqa: E402

VOCAB = {"uid": 50, "mid": 80, "cat": 9}


@pytest.fixture(scope="module")
def din_jax_run():
    """din_jax's trainer, its initial params (numpy) and a batch of 32 with histories from 4 to 100 (cut to 50)."""
    config = default.get_config()
    trainer = train.create_trainer(config, VOCAB)
    params = jax.tree.map(np.array, trainer.init_state(config).params)
    split = books_shaped.books_shaped_split(num_pairs=40, seed=1, vocab_sizes=VOCAB)
    batch = batches_lib.make_batch(split, np.arange(30), config.max_seq_length, batch_size=32)  # 2 padding rows
    return trainer, params, batch


def din_jax_logits(trainer, params, batch) -> np.ndarray:
    logits, _ = trainer.model.apply({"params": jax.tree.map(jnp.asarray, params)}, jax.tree.map(jnp.asarray, batch))
    return np.asarray(logits)


def torch_trainer(params, embedding_grads: str = "sparse") -> torch_din.Trainer:
    trainer = torch_din.Trainer(VOCAB, embedding_grads)
    torch_din.load_flax_params(trainer.model, params)
    return trainer


def test_books_shaped_split_has_books_vocabularies_and_label_pairs():
    split = books_shaped.books_shaped_split(num_pairs=1000, seed=0)
    lengths = split.hist_lengths
    assert split.uid.max() < 543_060 and split.mid.max() < 367_983 and split.cat.max() < 1_601
    np.testing.assert_array_equal(split.label[:4], [0, 1, 0, 1])
    np.testing.assert_array_equal(split.uid[0::2], split.uid[1::2])
    np.testing.assert_array_equal(lengths[0::2], lengths[1::2])
    assert lengths.min() >= 1 and lengths.max() <= 100 and 12 < lengths.mean() < 16 and (lengths > 50).any()


@pytest.mark.parametrize("embedding_grads", torch_din.EMBEDDING_GRADS)
def test_torch_logits_equal_din_jax(din_jax_run, embedding_grads):
    trainer, params, batch = din_jax_run
    with torch.no_grad():
        logits = torch_trainer(params, embedding_grads).model(torch_din.to_tensors(batch)).numpy()
    np.testing.assert_allclose(logits, din_jax_logits(trainer, params, batch), atol=1e-5)


def test_torch_gradients_equal_din_jax(din_jax_run):
    trainer, params, batch = din_jax_run

    def loss_fn(p):
        logits, _ = trainer.model.apply({"params": p}, jax.tree.map(jnp.asarray, batch))
        return steps.weighted_sigmoid_cross_entropy(logits, batch["label"], batch["weight"])

    expected = jax.grad(loss_fn)(params)
    model = torch_trainer(params, "dense").model
    inputs = torch_din.to_tensors(batch)
    torch_din.weighted_sigmoid_cross_entropy(model(inputs), inputs["label"], inputs["weight"]).backward()
    np.testing.assert_allclose(model.mid_table.weight.grad.numpy(), expected["mid_table"], atol=1e-8)
    np.testing.assert_allclose(model.uid_table.weight.grad.numpy(), expected["uid_table"], atol=1e-8)
    np.testing.assert_allclose(model.attention_layers[0].weight.grad.numpy().T,
                               expected["attention_unit"]["att_0"]["kernel"], atol=1e-7)
    np.testing.assert_allclose(model.bn_scale.grad.numpy(), expected["bn"]["scale"], atol=1e-7)


def _gradient_steps(table: np.ndarray) -> list[np.ndarray]:
    """Two table gradients: the first is clipped (norm > 5), the second not; rows 0, 4 and 5 get none."""
    rng = np.random.default_rng(0)
    grads = [np.zeros_like(table), np.zeros_like(table)]
    grads[0][[1, 2]] = rng.normal(size=(2, table.shape[1])) * 10
    grads[1][[2, 3]] = rng.normal(size=(2, table.shape[1])) * 0.1
    return grads


def _torch_steps(table: np.ndarray, embedding_grads: str) -> np.ndarray:
    """The table after TorchDIN's clipping and table optimizer took _gradient_steps."""
    param = torch.nn.Parameter(torch.tensor(table))
    adam = torch.optim.SparseAdam([param], lr=1e-3) if embedding_grads == "lazy" else torch_din.TF1Adam([param])
    for g in _gradient_steps(table):
        rows = np.flatnonzero(np.abs(g).sum(1))
        param.grad = (torch.tensor(g) if embedding_grads == "dense" else
                      torch.sparse_coo_tensor(torch.tensor(rows[None]), torch.tensor(g[rows]), g.shape,
                                              check_invariants=True))
        torch_din.clip_by_norm_per_tensor_([param], 5.0)
        adam.step()
    return param.detach().numpy()


@pytest.mark.parametrize("embedding_grads", ["sparse", "dense"])
def test_tf1_adam_and_clipping_match_din_jax_whole_table_rule(embedding_grads):
    table = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    tx = optax.chain(optim.clip_by_norm_per_tensor(5.0), optim.tf_adam(1e-3))
    expected, opt_state = jnp.asarray(table), tx.init(jnp.asarray(table))
    for g in _gradient_steps(table):
        updates, opt_state = tx.update(jnp.asarray(g), opt_state, expected)
        expected = expected + updates
    actual = _torch_steps(table, embedding_grads)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)


def test_sparse_adam_matches_din_jax_row_sparse_rule():
    table = np.random.default_rng(1).normal(size=(6, 3)).astype(np.float32)
    rule = optim.adam_rows(1e-3)
    expected = jnp.asarray(table)
    slots, table_slots = rule.init(expected)
    for step, g in enumerate(_gradient_steps(table)):
        ids = np.flatnonzero(np.abs(g).sum(1))
        rows, row_slots, table_slots = rule.update(expected[ids], optim.clip_tensor(jnp.asarray(g[ids]), 5.0),
                                                   {k: v[ids] for k, v in slots.items()}, table_slots,
                                                   jnp.int32(step))
        expected = expected.at[ids].set(rows)
        slots = {k: v.at[ids].set(row_slots[k]) for k, v in slots.items()}
    actual = _torch_steps(table, "lazy")
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(actual[[0, 4, 5]], table[[0, 4, 5]])  # untouched rows never move
    # Row 1 has a gradient only in the first step: TF1 Adam moves it again in the second, lazy Adam does not.
    assert not np.allclose(actual[1], _torch_steps(table, "sparse")[1], rtol=0, atol=1e-5)


def test_tf_logits_equal_din_jax(din_jax_run):
    pytest.importorskip("tensorflow")
    from benchmarks.peers import tf_din
    trainer, params, batch = din_jax_run
    model = tf_din.TFDIN(VOCAB)
    tf_din.load_flax_params(model, params)
    logits = model({key: batch[key] for key in tf_din.INPUT_KEYS}).numpy()
    np.testing.assert_allclose(logits, din_jax_logits(trainer, params, batch), atol=1e-5)
