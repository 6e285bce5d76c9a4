"""Row-sparse embedding updates against the whole-table path, micro-batching and precision options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import default
from din_jax import train
from din_jax.embedding import host_row_lookups, pop_host_lookups, row_lookups, unique_ids
from din_jax.packing import pack_history, packed_size

VOCAB = {"uid": 40, "mid": 60, "cat": 9}
B, T = 16, 7


def batches(steps: int, seed: int = 0, hot_rows: int | None = None):
    """Random batches; with hot_rows, every mid/cat/uid id lies in [0, hot_rows) and all appear every step."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(steps):
        lengths = rng.integers(0, T + 1, B)
        mask = np.arange(T)[None] < lengths[:, None]

        def ids(size, shape):
            upper = hot_rows or size
            return rng.integers(0, upper, shape).astype(np.int32)

        batch = {"uid": ids(VOCAB["uid"], B), "mid": ids(VOCAB["mid"], B), "cat": ids(VOCAB["cat"], B),
                 "hist_mids": np.where(mask, ids(VOCAB["mid"], (B, T)), 0).astype(np.int32),
                 "hist_cats": np.where(mask, ids(VOCAB["cat"], (B, T)), 0).astype(np.int32),
                 "hist_mask": mask, "label": rng.integers(0, 2, B).astype(np.float32),
                 "weight": np.r_[np.ones(B - 2), np.zeros(2)].astype(np.float32), "user": np.zeros(B, np.int32)}
        if hot_rows:
            for column, size in (("uid", B), ("mid", B), ("cat", B)):
                batch[column][:hot_rows] = np.arange(hot_rows)
        out.append(batch)
    return out


def config_for(**overrides) -> ml_collections.ConfigDict:
    config = default.get_config()
    config.max_seq_length = T
    config.learning_rate = 0.05
    config.update(overrides)
    return config


def train_state(config, stream):
    trainer = train.create_trainer(config, VOCAB)
    state = trainer.init_state(config)
    for batch in stream:
        state, _ = trainer.train_step(state, batch)
    return jax.tree.map(np.asarray, state)


def train_params(config, stream):
    return train_state(config, stream).params


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7, keys=None):
    for name in keys or a:
        for left, right in zip(jax.tree.leaves(a[name]), jax.tree.leaves(b[name])):
            np.testing.assert_allclose(left, right, rtol=rtol, atol=atol, err_msg=name)


# adagrad slow: test_optim checks its row rule against dense Adagrad on every row, and adagraddecay runs this path.
@pytest.mark.parametrize("optimizer", [pytest.param("adagrad", marks=pytest.mark.slow), "adagraddecay"])
def test_row_sparse_updates_equal_whole_table_updates(optimizer):
    """AdagradDecay: both paths run DeepRec's sparse kernel on the tables (rows skipped in some steps)."""
    stream = batches(6)
    sparse_state = train_state(config_for(optimizer=optimizer, adagrad_decay_step=2, adagrad_decay_rate=0.5), stream)
    dense_state = train_state(config_for(optimizer=optimizer, adagrad_decay_step=2, adagrad_decay_rate=0.5,
                                         sparse_embeddings=False), stream)
    sparse, dense = sparse_state.params, dense_state.params
    assert_trees_close(sparse, dense, rtol=2e-5, atol=1e-6)
    if optimizer == "adagraddecay":
        whole_table = dense_state.opt_state["dense"][1]  # after the clip's EmptyState
        for table, slots in sparse_state.opt_state["rows"].items():
            np.testing.assert_array_equal(slots["power"], whole_table.power[table], err_msg=table)
            np.testing.assert_allclose(slots["acc"], whole_table.accumulator[table], rtol=2e-5, err_msg=table)
        assert whole_table.power["logit"]["kernel"].shape == ()  # dense variables: one power each
    untouched = np.setdiff1d(np.arange(VOCAB["mid"]), np.concatenate(
        [np.r_[b["mid"], b["hist_mids"][b["hist_mask"]]] for b in stream]))
    init = train.create_trainer(config_for(), VOCAB).init_state(config_for()).params["mid_table"]
    np.testing.assert_array_equal(sparse["mid_table"][untouched], np.asarray(init)[untouched])


def test_row_sparse_adam_equals_dense_adam_on_rows_touched_every_step():
    stream = batches(5, seed=1, hot_rows=4)
    sparse = train_params(config_for(optimizer="adam", learning_rate=0.001), stream)
    dense = train_params(config_for(optimizer="adam", learning_rate=0.001, sparse_embeddings=False), stream)
    # Adam moves every weight by ~lr whatever the gradient's size, so float32 summation-order noise in
    # near-zero gradients can show up at ~1e-3 of lr; compare at that scale.
    for table in ("uid_table", "mid_table", "cat_table"):
        np.testing.assert_allclose(sparse[table][:4], dense[table][:4], rtol=1e-4, atol=2e-6)
    # The attention output bias cannot change a softmax (shift invariance): its gradient is pure float
    # noise, which Adam scales up to +-lr; it is the one leaf left out.
    sparse["attention_unit"]["att_out"].pop("bias"), dense["attention_unit"]["att_out"].pop("bias")
    assert_trees_close(sparse, dense, rtol=1e-4, atol=2e-6, keys=[k for k in sparse if not k.endswith("_table")])


def test_padding_and_masked_positions_touch_no_row():
    batch = batches(1)[0]
    lookups = row_lookups(batch, {"uid_table": VOCAB["uid"], "mid_table": VOCAB["mid"], "cat_table": VOCAB["cat"]})
    real = batch["weight"] > 0
    want_mids = np.unique(np.r_[batch["mid"][real], batch["hist_mids"][real[:, None] & batch["hist_mask"]]])
    got = np.asarray(lookups["mid_table"].ids)
    np.testing.assert_array_equal(got[got < VOCAB["mid"]], want_mids)


# Presence maps with packed positions, sorts with the [B, T] grid: each regime and each layout once.
@pytest.mark.parametrize("packed, vocab", [(True, VOCAB), (False, {"uid": 5_000, "mid": 20_000, "cat": 9})])
def test_host_row_lookups_equal_the_steps_own(packed, vocab):
    """A single-device step takes its unique ids and inverse from the host: they must be the step's own, padding
    rows, masked and packing positions included."""
    batch = batches(1, seed=4)[0]
    batch["mid"][:3] = batch["hist_mids"][0, 0]  # repeats across columns
    if packed:
        mask = batch["hist_mask"]
        batch["hist_index"] = pack_history(batch, 8, packed_size(int(mask.sum()), 8, mask.size) + 8)["hist_index"]
    sizes = {f"{name}_table": size for name, size in vocab.items()}
    host, device = pop_host_lookups({**batch, **host_row_lookups(batch, sizes)})[1], row_lookups(batch, sizes)
    for table, want in device.items():
        assert host[table].ids.dtype == np.int32 and host[table].inverse.dtype == np.int32
        np.testing.assert_array_equal(host[table].ids, want.ids, err_msg=table)
        np.testing.assert_array_equal(host[table].inverse, want.inverse, err_msg=table)


# Dense slow: the whole-table reference path; its micro-batch scan is the row-sparse one's (same accumulate).
@pytest.mark.parametrize("sparse", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_micro_batches_equal_the_large_batch(sparse):
    stream = batches(3, seed=2)
    whole = train_params(config_for(optimizer="adagrad", sparse_embeddings=sparse), stream)
    micro = train_params(config_for(optimizer="adagrad", sparse_embeddings=sparse, micro_batch=4), stream)
    assert_trees_close(whole, micro, rtol=1e-5, atol=1e-6)


# mixed_bf16 slow: test_mixed_bf16_is_deeprecs_bf16_attention_in_fp32_top_mlp_in_bf16 checks its model, bf16 here
# the train step with a non-fp32 dtype.
@pytest.mark.parametrize("precision", [pytest.param("mixed_bf16", marks=pytest.mark.slow), "bf16"])
def test_precisions_train_and_keep_loss_in_fp32(precision):
    stream = batches(3, seed=3)
    config = config_for(precision=precision)
    trainer = train.create_trainer(config, VOCAB)
    state = trainer.init_state(config)
    # bf16: the tables (99.9% of the parameters) are stored in bf16; every other parameter stays fp32.
    assert state.params["mid_table"].dtype == (np.dtype("bfloat16") if precision == "bf16" else np.float32)
    assert state.params["hidden_layers_0"]["kernel"].dtype == np.float32
    assert all(slot.dtype == np.float32 for slot in jax.tree.leaves(state.opt_state["rows"]["mid_table"])
               if slot.ndim == 2)
    losses = []
    for batch in stream:
        state, metrics = trainer.train_step(state, batch)
        assert metrics["loss"].dtype == np.float32
        losses.append(float(metrics["loss"]))
    assert np.all(np.isfinite(losses))
    probs = trainer.eval_step(state, stream[0])
    assert probs.dtype == np.float32
    fp32 = train_params(config_for(), stream)
    assert np.abs(np.asarray(state.params["logit"]["kernel"], np.float32) - fp32["logit"]["kernel"]).max() < 0.05


def test_mixed_bf16_is_deeprecs_bf16_attention_in_fp32_top_mlp_in_bf16():
    from din_jax.model import DIN
    batch = batches(1, seed=4)[0]
    fp32 = DIN(vocab_sizes=VOCAB, embedding_dim=6)
    mixed = fp32.clone(dtype=jax.numpy.bfloat16)
    variables = fp32.init(jax.random.PRNGKey(0), batch)
    logits, weights = fp32.apply(variables, batch)
    mixed_logits, mixed_weights = mixed.apply(variables, batch)
    np.testing.assert_array_equal(mixed_weights, weights)  # the attention unit is computed in fp32
    assert not np.array_equal(mixed_logits, logits)  # the top MLP in bf16
    np.testing.assert_allclose(mixed_logits, logits, atol=0.05)
    jaxpr = str(jax.make_jaxpr(lambda v: mixed.apply(v, batch))(variables))
    assert "bf16[16,54]" in jaxpr and "bf16[16,200]" in jaxpr and "bf16[112" not in jaxpr  # none per position


# Sharding is optimizer-independent; the other rules' row updates are checked unsharded above. Slow: on 1 device,
# bit for bit, what test_sharded_tables checks on 2 and 4 devices (micro-batches included) to float tolerance.
@pytest.mark.parametrize("optimizer", [pytest.param("adam", marks=pytest.mark.slow),
                                       pytest.param("adagrad", marks=pytest.mark.slow),
                                       pytest.param("adagraddecay", marks=pytest.mark.slow)])
def test_sharded_tables_equal_replicated_tables(optimizer):
    stream = batches(4, seed=4)
    results = []
    for shard in (False, True):
        # uid and mid routed to their rows' owners, cat (9 rows) replicated with a dense gradient buffer.
        config = config_for(optimizer=optimizer, adagrad_decay_step=2, shard_embeddings=shard, micro_batch=2,
                            shard_min_rows=VOCAB["uid"])
        trainer = train.create_trainer(config, VOCAB)
        state = trainer.init_state(config)
        assert state.params["mid_table"].sharding.spec == (P("data") if shard else P())
        assert state.params["cat_table"].sharding.spec == P()
        for batch in stream:
            state, _ = trainer.train_step(state, batch)
        results.append((jax.tree.map(np.asarray, state.params), jax.tree.map(np.asarray, state.opt_state),
                        np.asarray(trainer.eval_step(state, stream[0]))))
    (params, slots, probs), (sharded_params, sharded_slots, sharded_probs) = results
    real = stream[0]["weight"] > 0
    np.testing.assert_array_equal(sharded_probs[real], probs[real])
    for name, (left, right) in {"params": (params, sharded_params), "slots": (slots, sharded_slots)}.items():
        for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(left)[0], jax.tree.leaves(right)):
            np.testing.assert_array_equal(a, b[:len(a)] if a.ndim else b, err_msg=name + jax.tree_util.keystr(path))


@pytest.mark.parametrize("optimizer", ["adam", "adamasync", "adagrad", "adagraddecay"])
def test_every_optimizer_trains_several_donated_steps(optimizer):
    """Each optimizer's state can be donated step after step (no buffer shared between two slots)."""
    config = config_for(optimizer=optimizer)
    trainer = train.create_trainer(config, VOCAB)
    state = trainer.init_state(config)
    for batch in batches(3, seed=4):
        state, metrics = trainer.train_step(state, batch)
    assert np.isfinite(float(metrics["loss"])) and int(state.step) == 3


def skewed_batches(steps: int, seed: int):
    """Batches whose ids follow a steep power law: a few rows every step, others in some steps, some never."""
    rng = np.random.default_rng(seed)
    out = []
    for batch in batches(steps, seed):
        for column, size in (("uid", VOCAB["uid"]), ("mid", VOCAB["mid"]), ("cat", VOCAB["cat"]),
                             ("hist_mids", VOCAB["mid"]), ("hist_cats", VOCAB["cat"])):
            p = 1.0 / np.arange(1, size + 1) ** 2.5
            p[-3:] = 0  # never looked up
            drawn = rng.choice(size, batch[column].shape, p=p / p.sum()).astype(np.int32)
            batch[column] = np.where(batch["hist_mask"], drawn, 0) if column.startswith("hist") else drawn
        out.append(batch)
    return out


def test_exact_adam_trains_as_whole_table_adam_and_lazy_adam_does_not():
    """End to end on rows skipped in some steps (tests/test_optim.py checks the rule itself over 400 steps; here
    training's own float noise, which Adam amplifies to ~lr on near-zero gradients, limits the steps compared)."""
    stream = skewed_batches(5, seed=5)
    touched = [np.unique(np.r_[b["mid"], b["hist_mids"][b["hist_mask"]]]) for b in stream]
    assert len(set.union(*map(set, touched))) > len(set.intersection(*map(set, touched)))  # rows that skip steps
    config = config_for(optimizer="adam", learning_rate=0.001)
    trainer = train.create_trainer(config, VOCAB)
    state = trainer.init_state(config)
    for batch in stream:
        state, _ = trainer.train_step(state, batch)
    lagging = jax.tree.map(np.asarray, state.params)
    exact = jax.tree.map(np.asarray, trainer.readable(state).params)
    whole = train_params(config_for(optimizer="adam", learning_rate=0.001, sparse_embeddings=False), stream)
    lazy = train_params(config_for(optimizer="lazyadam", learning_rate=0.001), stream)
    for table in ("uid_table", "mid_table", "cat_table"):
        # Measured: at most 2.5e-7 apart (uid), against 2e-3 for lazy Adam (mid).
        np.testing.assert_allclose(exact[table], whole[table], rtol=0, atol=1e-6, err_msg=table)
    assert np.abs(lazy["mid_table"] - whole["mid_table"]).max() > 1e-3
    assert np.abs(lagging["mid_table"] - whole["mid_table"]).max() > 1e-4  # the live state lags until read


@pytest.mark.parametrize("table_size", [9, 1_000])  # presence map (<= 32x the lookups) and sort
def test_unique_ids_equal_jnp_unique_with_inverse(table_size):
    rng = np.random.default_rng(0)
    ids = jnp.asarray(np.where(rng.random(20) < 0.2, table_size, rng.integers(0, min(table_size, 12), 20)), jnp.int32)
    size = min(ids.shape[0], table_size + 1)
    want_unique, want_inverse = jnp.unique(ids, size=size, fill_value=table_size, return_inverse=True)
    unique, inverse = unique_ids(ids, table_size, size)
    np.testing.assert_array_equal(unique, want_unique)
    np.testing.assert_array_equal(inverse, want_inverse.reshape(-1))
    np.testing.assert_array_equal(unique[inverse], ids)
