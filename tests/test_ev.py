"""Host-side embedding mappings (din_jax/ev.py) on hand-made id streams with exact expectations."""

from __future__ import annotations

import numpy as np
import pytest

from din_jax import ev


def ids(*values) -> np.ndarray:
    return np.array(values, np.int64)


def default_sources(values) -> np.ndarray:
    return -ev.default_rows(np.asarray(values, np.int64)) - 1


# ------------------------------------------------------------------------------------------ hashing
def test_hash64_is_splitmix64():
    # The first output of the reference splitmix64 generator seeded with 0.
    assert int(ev.hash64(ids(0))[0]) == 0xE220A8397B1DCDAF
    assert ev.hash64(ids(1, 2)).dtype == np.uint64
    assert not np.array_equal(ev.hash64(ids(1, 2), seed=1), ev.hash64(ids(1, 2)))


def test_hash_tokens_are_stable_non_negative_blake2b_values():
    got = ev.hash_tokens(["B000FA64PK", "", "é"])
    np.testing.assert_array_equal(got, [4388890703693079674, 3797230976420062948, 3394012004367669963])
    assert got.dtype == np.int64 and (got >= 0).all()


def test_default_matrix_is_deterministic_from_the_seed():
    a = ev.default_matrix(7, 8)
    assert a.shape == (4096, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, ev.default_matrix(7, 8))
    assert not np.array_equal(a, ev.default_matrix(8, 8))
    assert np.abs(a).max() <= 2 * 8**-0.5  # truncated at 2 stddev
    glorot = ev.default_matrix(7, 8, "glorot_uniform")
    assert np.abs(glorot).max() <= np.sqrt(6 / (4096 + 8))
    with pytest.raises(ValueError, match="initializer"):
        ev.default_matrix(0, 8, "ones")


def test_default_rows_are_hash_mod_4096():
    values = ids(0, 1, 4096, 2**40)
    np.testing.assert_array_equal(ev.default_rows(values), ev.hash64(values) % 4096)


def test_id_table_agrees_with_a_dict_under_inserts_and_removes():
    rng = np.random.default_rng(0)
    table, reference = ev._IdTable(8, value=np.int64), {}
    for round_ in range(30):
        new = np.setdiff1d(rng.integers(0, 500, 40), np.array(list(reference), np.int64))
        table.insert(new, value=new * 10 + round_)
        reference.update({int(k): int(k) * 10 + round_ for k in new})
        gone = rng.choice(np.array(sorted(reference)), size=min(15, len(reference)), replace=False)
        table.remove(table.find(gone))
        for k in gone:
            del reference[int(k)]
        probe = np.arange(500)
        pos = table.find(probe)
        got = {int(k): int(table.cols["value"][p]) for k, p in zip(probe, pos) if p >= 0}
        assert got == reference
    keys, values = table.entries()
    assert keys.tolist() == sorted(reference) and values["value"].tolist() == [reference[k] for k in sorted(reference)]


# ------------------------------------------------------------------------------------------ EmbeddingVariable
def test_ev_admits_on_first_lookup_in_id_order_with_default_rows():
    var = ev.EmbeddingVariable(capacity=8, dim=4)
    out = var.map(np.array([[30, 10], [-1, 20]]), step=0, train=True)
    np.testing.assert_array_equal(out.slots, [[2, 0], [8, 1]])  # new ids take slots in ascending id order
    np.testing.assert_array_equal(out.init_slots, [0, 1, 2])
    np.testing.assert_array_equal(out.init_sources, default_sources([10, 20, 30]))
    assert out.num_rows == 8 and out.slots.dtype == np.int32 and out.slots_r is None and out.blocks is None


def test_ev_keeps_an_id_on_its_slot_and_ignores_padding():
    var = ev.EmbeddingVariable(capacity=8, dim=4)
    var.map(ids(5, 6), 0, True)
    out = var.map(ids(6, -1, 5, 7, -5), 1, True)
    np.testing.assert_array_equal(out.slots, [1, 8, 0, 2, 8])
    np.testing.assert_array_equal(out.init_slots, [2])
    assert var.stats()["rows_held"] == 3


@pytest.mark.parametrize("filter", ["counter", "cbf"])
def test_filter_admits_after_exactly_filter_freq_lookups_counted_per_occurrence(filter):
    var = ev.EmbeddingVariable(capacity=8, dim=4, filter=filter, filter_freq=3, cbf_expected_ids=1000)
    first = var.map(ids(5, 5, 7), 0, True)  # 5 counted twice in one batch
    np.testing.assert_array_equal(first.slots, [8, 8, 8])
    assert first.init_slots.size == 0
    second = var.map(ids(7, 5, 9, 9, 9), 1, True)  # 5 reaches 3; 9 reaches 3 within its first batch
    np.testing.assert_array_equal(second.slots, [8, 0, 1, 1, 1])
    np.testing.assert_array_equal(second.init_slots, [0, 1])
    np.testing.assert_array_equal(second.init_sources, default_sources([5, 9]))
    third = var.map(ids(7, 5), 2, True)
    np.testing.assert_array_equal(third.slots, [2, 0])
    np.testing.assert_array_equal(third.init_slots, [2])
    assert var.stats()["fallback_lookups"] == 3 + 1


def test_evaluation_admits_counts_and_records_nothing():
    var = ev.EmbeddingVariable(capacity=8, dim=4, filter="counter", filter_freq=2)
    var.map(ids(1, 1, 2), 0, True)
    before = var.state_dict()
    for step in range(3):
        out = var.map(ids(2, 3, 3, 1), step + 1, False)
        np.testing.assert_array_equal(out.slots, [8, 8, 8, 0])
        assert out.init_slots.size == 0
    after = var.state_dict()
    assert before.keys() == after.keys() and all(np.array_equal(before[k], after[k]) for k in before)
    np.testing.assert_array_equal(var.map(ids(2), 4, True).slots, [1])  # one more training lookup admits 2


def test_evict_stale_drops_exactly_the_ids_not_seen_for_more_than_steps_to_live():
    var = ev.EmbeddingVariable(capacity=8, dim=4)
    var.map(ids(10, 11, 12), 0, True)
    var.map(ids(11), 3, True)
    var.map(ids(12), 5, True)
    gone = var.evict_stale(step=6, steps_to_live=2)  # 10 (step 0) and 11 (step 3) are stale; 12 is 1 step old
    np.testing.assert_array_equal(gone.slots, [0, 1])
    np.testing.assert_array_equal(gone.ids, [10, 11])
    assert var.stats()["rows_held"] == 1 and var.stats()["evicted"] == 2
    np.testing.assert_array_equal(var.map(ids(10, 11, 12), 6, False).slots, [8, 8, 2])
    again = var.map(ids(11, 13, 10), 7, True)  # evicted ids are new again: lowest free slots, default rows
    np.testing.assert_array_equal(again.slots, [1, 3, 0])
    np.testing.assert_array_equal(again.init_slots, [0, 1, 3])
    np.testing.assert_array_equal(again.init_sources, default_sources([10, 11, 13]))


def test_evicted_ids_start_counting_again_under_the_counter_filter():
    var = ev.EmbeddingVariable(capacity=4, dim=4, filter="counter", filter_freq=2)
    var.map(ids(1, 1, 2), 0, True)
    gone = var.evict_stale(step=10, steps_to_live=5)  # 1 (admitted) and 2's waiting count are both stale
    np.testing.assert_array_equal(gone.ids, [1])
    assert var.stats()["waiting_ids"] == 0
    np.testing.assert_array_equal(var.map(ids(1, 2), 11, True).slots, [4, 4])
    out = var.map(ids(1, 2), 12, True)
    np.testing.assert_array_equal(out.slots, [0, 1])
    np.testing.assert_array_equal(out.init_sources, default_sources([1, 2]))


def test_cbf_keeps_the_pre_admission_counts_of_an_evicted_id():
    var = ev.EmbeddingVariable(capacity=4, dim=4, filter="cbf", filter_freq=3, cbf_expected_ids=1000)
    var.map(ids(1, 1), 0, True)
    var.map(ids(1), 1, True)  # admitted with 2 counts in the filter
    var.evict_stale(step=10, steps_to_live=5)
    np.testing.assert_array_equal(var.map(ids(1), 11, True).slots, [0])


def test_evict_small_drops_exactly_the_rows_below_the_threshold():
    var = ev.EmbeddingVariable(capacity=6, dim=2)
    var.map(ids(40, 41, 42, 43), 0, True)
    rows = np.array([[0.1, 0.0], [1.0, 1.0], [0.0, 0.2], [0.5, 0.5], [0, 0], [0, 0]], np.float32)
    weights = ev.l2_weight(rows)
    np.testing.assert_allclose(weights[:4], [0.005, 1.0, 0.02, 0.25])
    gone = var.evict_small(weights, threshold=0.1)  # slots 4, 5 are free: never evicted
    np.testing.assert_array_equal(gone.slots, [0, 2])
    np.testing.assert_array_equal(gone.ids, [40, 42])
    with pytest.raises(ValueError, match=r"row_norms has shape \(4,\)"):
        var.evict_small(weights[:4], 0.1)


def test_freed_slots_are_reused_lowest_first():
    var = ev.EmbeddingVariable(capacity=6, dim=2)
    var.map(ids(1, 2, 3, 4), 0, True)
    var.map(ids(1, 3), 5, True)
    var.evict_stale(step=5, steps_to_live=1)  # frees slots 1 and 3
    out = var.map(ids(9, 8, 7), 6, True)
    np.testing.assert_array_equal(out.slots, [4, 3, 1])  # 7 -> 1, 8 -> 3, 9 -> the first never-used slot


def test_full_table_raises_a_clear_error_and_changes_nothing():
    var = ev.EmbeddingVariable(capacity=2, dim=2, name="mid", capacity_field="ev.mid.capacity")
    var.map(ids(1, 2), 0, True)
    before = var.state_dict()
    with pytest.raises(ev.CapacityError, match=r"'mid' is full: all 2 rows .* 1 more ids .*'ev.mid.capacity'"):
        var.map(ids(1, 3), 1, True)
    after = var.state_dict()
    assert all(np.array_equal(before[k], after[k]) for k in before)
    var.evict_stale(step=3, steps_to_live=1)
    np.testing.assert_array_equal(var.map(ids(3), 3, True).slots, [0])


def test_grow_doubles_the_rows_and_reports_the_new_row_count():
    var = ev.EmbeddingVariable(capacity=2, dim=2, on_full="grow")
    var.map(ids(1, 2), 0, True)
    out = var.map(ids(2, 3, 4, 5, -1), 1, True)
    assert out.num_rows == var.num_rows == 8  # 2 -> 4 is too small for 5 ids
    np.testing.assert_array_equal(out.slots, [1, 2, 3, 4, 8])
    np.testing.assert_array_equal(out.init_slots, [2, 3, 4])
    np.testing.assert_array_equal(var.map(ids(1, 5), 2, True).slots, [0, 4])
    assert var.stats()["capacity"] == 8


def test_touched_since_lists_the_rows_written_since_a_step():
    var = ev.EmbeddingVariable(capacity=8, dim=2)
    var.map(ids(1, 2, 3), 0, True)
    var.map(ids(2), 4, True)
    var.map(ids(4), 5, True)
    var.map(ids(1), 6, False)
    np.testing.assert_array_equal(var.touched_since(4), [1, 3])
    np.testing.assert_array_equal(var.touched_since(0), [0, 1, 2, 3])


# ------------------------------------------------------------------------------------------ counting Bloom filter
def test_cbf_size_follows_the_standard_formulas():
    cbf = ev.CountingBloomFilter(expected_ids=1000, false_positive=0.01)
    assert cbf.m == 9586 and cbf.k == 7 and cbf.counters.dtype == np.uint8


def test_cbf_has_no_false_negatives_and_about_the_target_false_positive_rate():
    rng = np.random.default_rng(1)
    var = ev.EmbeddingVariable(capacity=20_000, dim=2, filter="cbf", filter_freq=2, cbf_expected_ids=20_000,
                               cbf_false_positive=0.01)
    seen = np.unique(rng.integers(0, 2**60, 20_000))
    assert (var.map(seen, 0, True).slots == var.num_rows).mean() > 0.995  # first lookups rarely admit
    assert (var.map(seen, 1, True).slots < var.num_rows).all()  # every second lookup admits: no false negatives
    fresh = np.setdiff1d(rng.integers(0, 2**60, 50_000), seen)
    probe = ev.EmbeddingVariable(capacity=100_000, dim=2, filter="cbf", filter_freq=2, cbf_expected_ids=20_000)
    probe.map(np.setdiff1d(rng.integers(0, 2**60, 20_000), fresh), 0, True)  # 20k waiting ids, one lookup each
    admitted_on_first_lookup = (probe.map(fresh, 1, True).slots < probe.num_rows).mean()
    assert 0.004 < admitted_on_first_lookup < 0.02


def test_cbf_memory_is_bounded_and_counter_memory_is_not():
    rng = np.random.default_rng(2)
    cbf = ev.EmbeddingVariable(capacity=1000, dim=2, filter="cbf", filter_freq=5, cbf_expected_ids=5000)
    counter = ev.EmbeddingVariable(capacity=1000, dim=2, filter="counter", filter_freq=5)
    sizes = []
    for step in range(5):
        batch = rng.integers(0, 2**60, 4000)
        cbf.map(batch, step, True)
        counter.map(batch, step, True)
        sizes.append((cbf.stats()["host_bytes"], counter.stats()["host_bytes"]))
    assert len({s[0] for s in sizes}) == 1
    assert sizes[-1][1] > 2 * sizes[0][1] and counter.stats()["waiting_ids"] == 20_000


# ------------------------------------------------------------------------------------------ adaptive
def test_adaptive_promotes_frequent_ids_from_their_shared_row():
    emb = ev.AdaptiveEmbedding(capacity=4, hash_bucket_size=3, dim=2, promote_freq=2)
    shared = lambda v: 4 + int(ev.hash64(ids(v))[0] % 3)  # noqa: E731
    first = emb.map(ids(100, 200), 0, True)
    np.testing.assert_array_equal(first.slots, [shared(100), shared(200)])
    assert first.init_slots.size == 0
    second = emb.map(ids(200, -1, 100, 100), 1, True)
    np.testing.assert_array_equal(second.slots, [1, 7, 0, 0])
    np.testing.assert_array_equal(second.init_slots, [0, 1])
    np.testing.assert_array_equal(second.init_sources, [shared(100), shared(200)])  # copy of the shared row
    np.testing.assert_array_equal(emb.map(ids(100, 300), 2, False).slots, [0, shared(300)])


def test_adaptive_initial_rows_are_the_shared_rows_from_the_default_matrix():
    emb = ev.AdaptiveEmbedding(capacity=4, hash_bucket_size=3, dim=2)
    slots, sources = emb.initial_rows()
    np.testing.assert_array_equal(slots, [4, 5, 6])
    np.testing.assert_array_equal(sources, default_sources([0, 1, 2]))
    assert emb.num_rows == 7


def test_adaptive_keeps_ids_shared_when_own_rows_run_out():
    emb = ev.AdaptiveEmbedding(capacity=1, hash_bucket_size=5, dim=2, promote_freq=1)
    out = emb.map(ids(7, 3), 0, True)
    assert out.slots[1] == 0 and out.slots[0] == 1 + int(ev.hash64(ids(7))[0] % 5)
    emb.evict_stale(step=9, steps_to_live=1)
    np.testing.assert_array_equal(emb.map(ids(7), 9, True).slots, [0])


# ------------------------------------------------------------------------------------------ multi-hash
@pytest.mark.parametrize("n", list(range(1, 120)) + [1000, 1024])
def test_quotient_remainder_rows_are_unique_per_id(n):
    mh = ev.MultiHash(n, dim=4)
    m = int(np.ceil(np.sqrt(n)))
    assert (mh.remainder_rows, mh.quotient_rows, mh.num_rows) == (m, -(-n // m), -(-n // m) + m)
    out = mh.map(np.arange(n), 0, True)
    assert out.slots.max() < mh.quotient_rows <= out.slots_r.min() and out.slots_r.max() < mh.num_rows
    assert len(set(zip(out.slots.tolist(), out.slots_r.tolist()))) == n


def test_multihash_maps_padding_to_no_row_and_checks_the_range():
    mh = ev.MultiHash(10, dim=4)  # m = 4: Q has 3 rows, R has 4
    out = mh.map(np.array([[9, -1]]), 0, True)
    np.testing.assert_array_equal(out.slots, [[2, 7]])
    np.testing.assert_array_equal(out.slots_r, [[3 + 1, 7]])
    with pytest.raises(ValueError, match="id 10 >= num_ids_or_buckets 10"):
        mh.map(ids(10), 0, True)
    hashed = ev.MultiHash(10, dim=4, hash_ids=True).map(ids(2**50, 12345), 0, True)
    assert (hashed.slots < 3).all() and ((hashed.slots_r >= 3) & (hashed.slots_r < 7)).all()


def test_multihash_combine_is_add_mul_or_concat():
    q, r = np.array([[1.0, 2.0]]), np.array([[3.0, 5.0]])
    np.testing.assert_array_equal(ev.MultiHash(9, 2, "add").combine(q, r), [[4.0, 7.0]])
    np.testing.assert_array_equal(ev.MultiHash(9, 2, "mul").combine(q, r), [[3.0, 10.0]])
    concat = ev.MultiHash(9, 4, "concat")
    assert concat.row_dim == 2
    np.testing.assert_array_equal(concat.combine(q, r), [[1.0, 2.0, 3.0, 5.0]])
    with pytest.raises(ValueError, match="dim must be even, got 5"):
        ev.MultiHash(9, 5, "concat")


# ------------------------------------------------------------------------------------------ dynamic dimension
def test_dynamic_blocks_grow_with_decayed_frequency():
    dyn = ev.DynamicDimension(capacity=4, dim=6, block_size=2, thresholds=[2, 4], decay=0.5)
    assert dyn.map(ids(7), 0, True).blocks.tolist() == [1]  # freq 1
    assert dyn.map(ids(7, 7), 1, True).blocks.tolist() == [2, 2]  # 1 * 0.5 + 2 = 2.5
    out = dyn.map(ids(7, 7, 7, -1), 2, True)  # 2.5 * 0.5 + 3 = 4.25
    assert out.blocks.dtype == np.int8 and out.blocks.tolist() == [3, 3, 3, 0]
    assert dyn.map(ids(7, 8), 3, False).blocks.tolist() == [2, 0]  # 4.25 * 0.5 = 2.125; 8 has no row
    assert dyn.map(ids(7), 4, False).blocks.tolist() == [1]  # 4.25 * 0.25 = 1.06
    assert dyn.map(ids(7, 7), 3, True).blocks.tolist() == [3, 3]  # evaluation changed nothing: 2.125 + 2
    dyn.map(ids(9), 6, True)  # training reaches step 6; 7 was last looked up at 3 with freq 4.125
    # Evaluation and export pass no step: the frequency is decayed to the latest training step, 4.125 / 8.
    assert dyn.map(ids(7), 0, False).blocks.tolist() == [1]


def test_dynamic_checks_block_options():
    with pytest.raises(ValueError, match="not a multiple of block_size"):
        ev.DynamicDimension(capacity=4, dim=6, block_size=4, thresholds=[2])
    with pytest.raises(ValueError, match="increasing"):
        ev.DynamicDimension(capacity=4, dim=6, block_size=2, thresholds=[4, 2])


# ------------------------------------------------------------------------------------------ dense, factory
def test_dense_vocabulary_slot_is_the_id():
    dense = ev.DenseVocabulary(5, name="cat")
    out = dense.map(np.array([[4, 0, -1]]), 0, True)
    np.testing.assert_array_equal(out.slots, [[4, 0, 5]])
    np.testing.assert_array_equal(dense.touched_since(0), [0, 4])
    with pytest.raises(ValueError, match="'cat': id 5 is outside its vocabulary of 5"):
        dense.map(ids(5), 0, True)


def test_create_builds_every_kind_and_rejects_bad_options():
    assert isinstance(ev.create("ev", capacity=4, dim=2, filter="cbf"), ev.EmbeddingVariable)
    assert isinstance(ev.create("dynamic", capacity=4, dim=2, block_size=1, thresholds=[3], filter="counter"),
                      ev.DynamicDimension)
    assert set(ev.KINDS) == {"dense", "ev", "adaptive", "multihash", "dynamic"}
    with pytest.raises(ValueError, match="unknown embedding kind 'hash'"):
        ev.create("hash")
    with pytest.raises(ValueError, match=r"unknown options \['size'\], missing options \['vocab_size'\]"):
        ev.create("dense", size=3)
    with pytest.raises(ValueError, match="unknown ev filter 'bloom'"):
        ev.create("ev", capacity=4, dim=2, filter="bloom")
    with pytest.raises(ValueError, match="capacity must be an integer >= 1"):
        ev.create("ev", capacity=0, dim=2)


# ------------------------------------------------------------------------------------------ state, determinism
def stream(seed: int, steps: int = 12, size: int = 60, universe: int = 50):
    rng = np.random.default_rng(seed)
    for step in range(steps):
        batch = rng.integers(0, universe, size) * 7919  # raw-looking ids
        batch[rng.random(size) < 0.1] = -1
        yield step, batch.reshape(6, -1)


KIND_OPTIONS = [
    ("dense", dict(vocab_size=50 * 7919)),
    ("ev", dict(capacity=64, dim=4)),
    ("ev", dict(capacity=8, dim=4, on_full="grow", filter="counter", filter_freq=2)),
    ("ev", dict(capacity=64, dim=4, filter="cbf", filter_freq=3, cbf_expected_ids=200)),
    ("adaptive", dict(capacity=10, hash_bucket_size=7, dim=4, promote_freq=4)),
    ("multihash", dict(num_ids_or_buckets=100, dim=4, hash_ids=True)),
    ("dynamic", dict(capacity=64, dim=4, block_size=2, thresholds=[3], decay=0.9, filter="counter", filter_freq=2)),
]


def run_stream(mapping, steps, aliases: bool = False):
    """Maps each batch (evaluation every 4th step), evicting every 5th; aliases: with each id's dense index."""
    outs = []
    for step, batch in steps:
        alias = np.where(batch >= 0, batch // 7919, -1) if aliases else None
        outs.append(mapping.map(batch, step, train=step % 4 != 3, aliases=alias))
        if step % 5 == 4 and hasattr(mapping, "evict_stale"):
            outs.append(mapping.evict_stale(step, steps_to_live=2))
    return outs


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert type(x) is type(y)
        for u, v in zip(x, y):
            assert (u is None and v is None) or np.array_equal(u, v)


@pytest.mark.parametrize("kind,options", KIND_OPTIONS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(KIND_OPTIONS)])
def test_state_dict_round_trip_gives_identical_later_mappings(kind, options):
    steps = list(stream(3))
    original = ev.create(kind, **options)
    run_stream(original, steps[:7])
    state = original.state_dict()
    restored = ev.create(kind, **options)
    restored.load_state_dict(state)
    assert_same(run_stream(original, steps[7:]), run_stream(restored, steps[7:]))
    final_a, final_b = original.state_dict(), restored.state_dict()
    assert final_a.keys() == final_b.keys() and all(np.array_equal(final_a[k], final_b[k]) for k in final_a)
    assert original.stats() == restored.stats()


@pytest.mark.parametrize("kind,options", KIND_OPTIONS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(KIND_OPTIONS)])
def test_two_instances_fed_the_same_stream_agree(kind, options):
    assert_same(run_stream(ev.create(kind, **options), stream(4)), run_stream(ev.create(kind, **options), stream(4)))


@pytest.mark.parametrize("kind,options", KIND_OPTIONS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(KIND_OPTIONS)])
def test_aliases_change_no_row_through_admission_eviction_growth_and_reload(kind, options):
    steps = list(stream(5, steps=16))
    plain, aliased = ev.create(kind, **options), ev.create(kind, **options)
    assert_same(run_stream(plain, steps[:9]), run_stream(aliased, steps[:9], aliases=True))
    state = aliased.state_dict()
    later = run_stream(plain, steps[9:])
    assert_same(later, run_stream(aliased, steps[9:], aliases=True))
    assert all(np.array_equal(a, b) for a, b in zip(plain.state_dict().values(), aliased.state_dict().values()))
    aliased.load_state_dict(state)  # back to step 9: rows it remembers from later steps no longer hold
    assert_same(later, run_stream(aliased, steps[9:], aliases=True))


def test_aliases_spare_the_hash_probe_of_ids_met_before_until_rows_are_freed(monkeypatch):
    probed = []
    find = ev._IdTable.find
    monkeypatch.setattr(ev._IdTable, "find", lambda table, keys: probed.append(len(keys)) or find(table, keys))
    var = ev.EmbeddingVariable(capacity=16, dim=4)
    batch, alias = ids(11, 12, 13, 11, -1), np.array([1, 2, 3, 1, -1])
    first = var.map(batch, 0, True, aliases=alias).slots
    probed.clear()
    assert np.array_equal(var.map(batch, 1, True, aliases=alias).slots, first) and probed == []
    var.map(batch, 2, True)
    assert probed == [4]  # without aliases every real id is probed
    var.evict_stale(step=10, steps_to_live=1)  # frees all three rows
    probed.clear()
    slots = var.map(ids(13, 12), 11, True, aliases=np.array([3, 2])).slots
    assert probed and np.array_equal(slots, [1, 0])  # probed afresh, re-admitted in id order into the freed rows


def test_load_state_dict_rejects_a_state_of_other_options():
    state = ev.EmbeddingVariable(capacity=8, dim=2, filter="counter").state_dict()
    with pytest.raises(ValueError, match=r"missing \['cbf_counters'\], unexpected \['pending_counts'"):
        ev.EmbeddingVariable(capacity=8, dim=2, filter="cbf").load_state_dict(state)
    with pytest.raises(ValueError, match="slot_ids has shape"):
        ev.EmbeddingVariable(capacity=4, dim=2, filter="counter").load_state_dict(state)


def test_stats_report_rows_and_memory():
    var = ev.EmbeddingVariable(capacity=16, dim=8)
    var.map(ids(1, 2, 3, 3), 0, True)
    stats = var.stats()
    assert stats["rows_held"] == 3 and stats["capacity"] == 16 and stats["admitted"] == 3
    assert stats["device_bytes_held"] == 3 * 8 * 4 and stats["device_bytes"] == 16 * 8 * 4
    assert stats["host_bytes"] > 16 * 16


# ------------------------------------------------------------------------------------------ host stats
def test_rows_touched_is_reported_only_where_the_mappings_see_the_batches():
    from configs import default
    from din_jax.host_embeddings import HostEmbeddings, create_mappings
    sizes = {"uid": 5, "mid": 7, "cat": 3}
    batch = {"uid": np.array([1, 2]), "mid": np.array([3, 3]), "cat": np.array([1, 2]),
             "hist_mids": np.array([[4, 5], [6, 0]]), "hist_cats": np.array([[1, 1], [2, 0]]),
             "hist_mask": np.array([[True, True], [True, False]]), "weight": np.ones(2, np.float32)}
    config = default.get_config()
    plain = HostEmbeddings(config, create_mappings(config, sizes, sizes), {}, sizes)
    assert not plain.active  # batches bypass the mappings: rows touched is unknown, so not reported as 0
    assert all("rows_touched" not in stats for stats in plain.stats().values())
    config.incremental_ckpt = 60  # increments need the rows each step writes: the mappings see every batch
    tracked = HostEmbeddings(config, create_mappings(config, sizes, sizes), {}, sizes)
    tracked.map_batch(batch, 1, train=True)
    assert {f: s["rows_touched"] for f, s in tracked.stats().items()} == {"uid": 2, "mid": 4, "cat": 2}
