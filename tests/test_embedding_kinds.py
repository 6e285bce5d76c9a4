"""DeepRec's embedding kinds on the device: admitted rows, multi-hash rows, dynamic blocks, and whole runs."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from din_jax import ev, train
from din_jax.embedding import initialise_rows
from din_jax.host_embeddings import INIT_SLOTS, INIT_SOURCES
from din_jax.model import TableSpec
from tests.test_sparse import VOCAB, batches, config_for
from tests.test_train import small_config

RAW_IDS = {name: 10_000 + 7 * np.arange(size, dtype=np.int64) for name, size in VOCAB.items()}


def test_initialise_rows_copies_table_rows_and_default_rows_and_drops_padding():
    table = jnp.arange(12.0).reshape(6, 2)
    defaults = -jnp.arange(8.0).reshape(4, 2)
    out = initialise_rows(table, jnp.array([1, 4, 6]), jnp.array([5, -3, 0]), defaults)  # slot 6: padding
    expected = np.arange(12.0).reshape(6, 2)
    expected[1] = expected[5]             # source 5: row 5 of the table
    expected[4] = -np.arange(8.0).reshape(4, 2)[2]  # source -3: default row 2
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("combiner", ["add", "mul", "concat"])
def test_multihash_rows_combine_as_deeprec_on_the_device(combiner):
    mapping = ev.MultiHash(50, 18, combiner)
    rng = np.random.default_rng(0)
    q, r = (rng.standard_normal((5, mapping.row_dim)).astype(np.float32) for _ in range(2))
    spec = TableSpec(mapping.num_rows, mapping.row_dim, combiner=combiner)
    np.testing.assert_allclose(spec.combine(jnp.asarray(q), jnp.asarray(r)), mapping.combine(q, r), rtol=1e-6)


def test_dynamic_dimension_zeroes_the_blocks_an_id_has_not_earned():
    rows = jnp.ones((3, 18))
    out = TableSpec(10, 18, block_size=6).combine(rows, blocks=jnp.array([1, 2, 3]))
    np.testing.assert_array_equal(np.asarray(out).sum(axis=1), [6, 12, 18])
    assert not np.asarray(out)[0, 6:].any()


def mapped_stream(trainer, stream):
    """Every batch through the trainer's host mappings, in step order."""
    return [trainer.host.map_batch(batch, step, train=True) for step, batch in enumerate(stream)]


def test_embedding_variable_trains_as_a_dense_table_started_from_its_default_rows():
    """EV admission, default-row init and slot reset, checked against the plain row-sparse path."""
    config = config_for(ev=True)
    ev_trainer = train.create_trainer(config, VOCAB, raw_ids=RAW_IDS, id_sizes=VOCAB)
    stream = mapped_stream(ev_trainer, batches(5))
    state = ev_trainer.init_state(config)
    for batch in stream:
        state, _ = ev_trainer.train_step(state, batch)

    # The same steps on plain tables whose rows start as the rows EV admitted them with (lazy Adam, as EV tables).
    dense_config = config_for(optimizer="lazyadam")
    dense_trainer = train.create_trainer(dense_config, VOCAB)
    dense = dense_trainer.init_state(dense_config)
    params = dict(dense.params)
    for table, mapping in ev_trainer.host.mappings.items():
        ids = mapping.state_dict()["slot_ids"]
        held = np.flatnonzero(ids >= 0)
        rows = np.asarray(params[table]).copy()
        rows[held] = ev_trainer.host.defaults[table][ev.default_rows(ids[held])]
        params[table] = jnp.asarray(rows)
    dense = dense.replace(params=params)
    for batch in stream:
        plain = {k: v for k, v in batch.items() if not k.endswith((INIT_SLOTS, INIT_SOURCES))}
        dense, _ = dense_trainer.train_step(dense, plain)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(state.params)[0], jax.tree.leaves(dense.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_filtered_ids_read_zero_and_get_no_row_until_admitted():
    config = config_for(ev=True, ev_filter="counter", ev_filter_freq=1000)  # nobody is admitted
    trainer = train.create_trainer(config, VOCAB, raw_ids=RAW_IDS, id_sizes=VOCAB)
    state = trainer.init_state(config)
    before = jax.tree.map(np.asarray, state.params)
    for batch in mapped_stream(trainer, batches(2)):
        assert (batch["mid"] == trainer.host.mappings["mid_table"].num_rows).all()
        state, _ = trainer.train_step(state, batch)
    for table in ("uid_table", "mid_table", "cat_table"):
        np.testing.assert_array_equal(state.params[table], before[table])


# tests/test_export.py's two kind runs train, evaluate and export EV + cbf, multi-hash, adaptive and dynamic tables in
# the default run; the seed-flag spellings below run in the slow set, but for eviction, which only this one covers.
@pytest.mark.parametrize("flags", [pytest.param(dict(ev=True, ev_filter="cbf"), marks=pytest.mark.slow),
                                   pytest.param(dict(multihash=True), marks=pytest.mark.slow),
                                   pytest.param(dict(adaptive_emb=True, adaptive_hash_bucket_size=64),
                                                marks=pytest.mark.slow),
                                   dict(dynamic_ev=True, ev_elimination="gstep", ev_steps_to_live=2, save_steps=3)])
def test_every_kind_trains_evaluates_and_reports_its_rows(tmp_path, flags):
    results = train.train_and_evaluate(small_config(str(tmp_path / "data"), steps=6, **flags), str(tmp_path / "run"))
    assert 0.0 < results["eval"]["auc"] < 1.0
    summary = json.loads((tmp_path / "run" / "train_summary.json").read_text())
    assert set(summary["embeddings"]) == {"uid", "mid", "cat"}
    if "ev_elimination" in flags:
        assert sum(e["evicted"] for e in summary["embeddings"].values()) > 0


def final_params(workdir) -> dict:
    from tests.test_parallel import restored_state
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    return restored_state(workdir / "checkpoints" / str(steps[-1]) / "default")["params"]


def test_an_embedding_variable_run_resumes_exactly_with_its_id_mapping(tmp_path):
    data = str(tmp_path / "data")
    flags = dict(ev=True, ev_filter="counter", ev_elimination="gstep", ev_steps_to_live=3, save_steps=4)
    straight = train.train_and_evaluate(small_config(data, steps=8, **flags), str(tmp_path / "straight"))
    train.train_and_evaluate(small_config(data, steps=4, **flags), str(tmp_path / "resumed"))
    resumed = train.train_and_evaluate(small_config(data, steps=8, **flags), str(tmp_path / "resumed"))
    assert resumed["eval"] == straight["eval"]
    assert resumed["train"]["embeddings"] == straight["train"]["embeddings"]
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(final_params(tmp_path / "straight"))[0],
                            jax.tree.leaves(final_params(tmp_path / "resumed"))):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


def test_a_run_resumes_from_increments_on_top_of_the_last_full_checkpoint(tmp_path, monkeypatch):
    from din_jax import checkpoint
    data = str(tmp_path / "data")
    flags = dict(steps=7, save_steps=4, incremental_ckpt=1e-9, ev=True, ev_filter="counter")
    straight = train.train_and_evaluate(small_config(data, **flags), str(tmp_path / "straight"))
    save = checkpoint.Checkpointer.save

    def crash_at_step_7(self, step, *args, **kwargs):
        if step == 7:
            raise KeyboardInterrupt("killed while saving step 7")
        return save(self, step, *args, **kwargs)

    monkeypatch.setattr(checkpoint.Checkpointer, "save", crash_at_step_7)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(small_config(data, **flags), str(tmp_path / "crashed"))
    monkeypatch.setattr(checkpoint.Checkpointer, "save", save)
    increments = tmp_path / "crashed" / "checkpoints" / "incremental" / "4"
    assert sorted(p.name for p in increments.iterdir()) == ["5.npz", "6.npz", "7.npz"]
    resumed = train.train_and_evaluate(small_config(data, **flags), str(tmp_path / "crashed"))
    assert resumed["train"]["steps_this_run"] == 0  # step 7 came back from the increments
    assert resumed["eval"] == straight["eval"]
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(final_params(tmp_path / "straight"))[0],
                            jax.tree.leaves(final_params(tmp_path / "crashed"))):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("flags, kinds", [
    (dict(ev=True, multihash=True), ("ev", "ev", "ev")),
    (dict(ev=True, adaptive_emb=True), ("ev", "ev", "ev")),
    (dict(adaptive_emb=True, multihash=True), ("adaptive", "multihash", "multihash")),
    (dict(multihash=True), ("dense", "multihash", "multihash")),
    (dict(dynamic_ev=True, ev=True), ("dynamic", "dynamic", "dynamic")),
])
def test_seed_flags_combine_into_kinds_as_deeprecs_din(flags, kinds):
    from din_jax.host_embeddings import table_kinds
    config = config_for(**flags)
    assert tuple(table_kinds(config).values()) == kinds
    config.embeddings.uid = "multihash"  # a multi-hash uid is a per-feature choice
    assert table_kinds(config)["uid_table"] == "multihash"


@pytest.mark.parametrize("flags, named", [(dict(multihash=True, workqueue=True), "config.workqueue=False"),
                                          (dict(multihash=True, shard_embeddings=True), "shard_embeddings"),
                                          (dict(ev=True, sparse_embeddings=False), "sparse_embeddings=True"),
                                          (dict(ev_filter="counter"), "none is one"),
                                          (dict(ev_elimination="l2"), "config.ev_elimination='l2' applies to "
                                                                      "EmbeddingVariable features; none is one")])
def test_impossible_embedding_combinations_are_one_sentence_naming_the_key(flags, named):
    from din_jax.config_check import ConfigError, validate
    config = config_for(**flags)
    with pytest.raises(ConfigError, match=named):
        validate(config)
