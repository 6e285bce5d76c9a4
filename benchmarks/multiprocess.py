"""Data-parallel training on one machine: 1 process vs 2, what a train step communicates, and a 10-host estimate.

  python benchmarks/multiprocess.py [--num_users 20000] [--batch_sizes 512,2048] [--iters 100] [--steps 30]

About 4 minutes on 2 cores. Every process has one CPU device (launch.local); collectives are gloo over localhost.

1. Throughput: `python -m din_jax.main` on the built-in data (one epoch, global batch 512, no eval) with 1
   process and with 2; samples_per_sec and compile_seconds from each run's WORKDIR/train_summary.json.
2. Communication: a worker launched with 1 and with 2 processes builds din_jax's Trainer on the same data
   and, per global batch B:
   - times the jitted train step (median of --steps). With 2 processes three variants alternate step by
     step (same moment, same load from other work): the step as din_jax runs it (its gradient psum is one
     flat buffer: train._psum_as_one_buffer); the step with the psum per array as it was before (one gloo
     call per array instead of one, because XLA:CPU issues one gloo collective per array of an
     all-reduce); and an uncoupled step, each process alone on its
     own device with its B/2 share (no collectives), so (step - uncoupled) is what communication and
     waiting for the other process cost;
   - lists the collectives XLA compiled into the step (HLO all-reduce / all-gather: ops, arrays, bytes);
   - times jitted shard_map'd collectives of exactly the step's sizes (2 processes):
     (a)  psum of the dense (non-table) gradient pytree of create_train_state + the loss,
     (a1) the same as one flat buffer,
     (b)  all_gather of the touched ids, int32, per table: B_s (uid), B_s + P_s (mid, cat); B_s = B/N,
          P_s = packed history positions of a shard (the epoch's largest, as the train loop pads to),
     (c)  psum of the embedding-row gradients as the step has them: jnp.unique has a static size, so
          a table's row gradient is [N*L_s, 18] rows (every lookup of the global batch, padding included),
     (c') psum of [U, 18] per table, U = unique touched rows of a global batch (measured on the data):
          the cost if the static size were the unique count,
     (a)+(c) as the step does it (one psum of the whole gradient tuple), and a scalar psum;
     median of --iters rounds, each round calls every case once (interleaved), each call waited for.
3. Ring all-reduce model. XLA:CPU issues one gloo collective per array of a (tuple) all-reduce, so
     all-reduce: t = sum over arrays i of [2(N-1) alpha + 2(N-1)/N S_i / beta]  (bytes per device 2(N-1)/N S)
     all-gather: t = sum over arrays i of [ (N-1) alpha +  (N-1)/N S_i / beta]  (S_i gathered bytes)
   alpha from the 4-byte psum, beta from the slope of a psum size sweep (both 2 processes, localhost,
   the empty program's dispatch subtracted). Per step, global batch B, history width T, P = N P_s packed
   positions (~ fill B T plus padding to pack_granularity per shard), D dense floats, E = 18:
     S_a = 4 (D + 1)              in 19 + 1 arrays (dense leaves + loss); independent of B, N and V
     S_b = 4 (B + 2 (B + P))      3 arrays (ids of every lookup)
     S_c = 4 E (B + 2 (B + P))    3 arrays, as implemented; 4 E (U_uid + U_mid + U_cat) if unique-sized
     config.shard_embeddings adds a psum of the gathered rows, another S_c (3 arrays).
   Updates are row-sparse, so no term grows with V (U <= min(V, lookups) bounds a unique-sized psum).
   Measured: alpha, beta (localhost), dispatch, P, U, D, the HLO's arrays, the per-host compute (the
   1-process step at 512). Assumed for the 10 and 100 Gbit/s rows: the line rate as beta and the
   localhost alpha + 25 / 5 us per ring hop; throughout: no overlap of communication with compute, a
   collective in the step costing what it costs alone, and per-host compute unchanged although every
   host also sorts and updates the global batch's N*L_s rows (not modelled; it grows with N).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import re
import shutil
import statistics
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)  # run as a script from anywhere; launch/ is not an installed package

EMBEDDING_DIM = 18
TABLE_COLUMNS = {"uid_table": ("uid",), "mid_table": ("mid", "hist_mids"), "cat_table": ("cat", "hist_cats")}
PSUM_SWEEP_FLOATS = (1, 1024, 16384, 131072, 524288, 2097152)  # 4 B .. 8 MiB, one array each
NETWORKS = {"10 Gbit/s": (10e9 / 8, 25e-6), "100 Gbit/s": (100e9 / 8, 5e-6)}  # assumed: bytes/s, extra s per hop
_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "f64": 8, "s64": 8, "u64": 8, "pred": 1,
                "s8": 1, "u8": 1}


# ---------------------------------------------------------------------------------------------------------
# Worker: runs in every process of a launch.local run (1 or N processes, one CPU device each).


def _config(args, batch_size: int):
    from configs import default
    config = default.get_config()
    config.batch_size = batch_size
    config.data_dir = args.data_dir
    config.synthetic.num_users = args.num_users
    config.progress_bar = False
    config.no_eval = True
    return config


def interleaved_ms(cases: dict, rounds: int, warmup: int = 5) -> dict[str, float]:
    """{name: median wall ms} of every (fn, args) in `cases`; each round calls each case once, waited for."""
    import jax
    for fn, fn_args in cases.values():
        for _ in range(warmup):
            jax.block_until_ready(fn(*fn_args))
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, (fn, fn_args) in cases.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*fn_args))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) * 1000 for name, t in times.items()}


def hlo_collectives(hlo_text: str) -> dict[str, dict[str, int]]:
    """{'all-reduce': {'ops', 'arrays', 'bytes'}, 'all-gather': ...} of a compiled HLO module (result shapes)."""
    out: dict[str, dict[str, int]] = {}
    pattern = re.compile(r"=\s+(.+?)\s+(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute)"
                         r"(?:-start)?\(")
    for line in hlo_text.splitlines():
        match = pattern.search(line)
        if not match:
            continue
        shapes = re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", match.group(1))
        entry = out.setdefault(match.group(2), {"ops": 0, "arrays": 0, "bytes": 0})
        entry["ops"] += 1
        entry["arrays"] += len(shapes)
        entry["bytes"] += sum(_DTYPE_BYTES.get(t, 4) * math.prod(int(d) for d in dims.split(",") if d)
                              for t, dims in shapes)
    return out


def unique_rows(split, batch_size: int, max_seq_length: int, seed: int, max_batches: int = 20) -> dict[str, float]:
    """Mean unique ids per table in a global batch of the first epoch (real examples and positions only)."""
    import numpy as np

    from input_pipeline import batches as batches_lib
    counts: dict[str, list[int]] = {name: [] for name in TABLE_COLUMNS}
    batches = batches_lib.train_batches(split, batch_size, max_seq_length, seed=seed, epoch=0)
    for batch in itertools.islice(batches, max_batches):
        real = batch["weight"] > 0
        for name, columns in TABLE_COLUMNS.items():
            ids = [batch[columns[0]][real]]
            if len(columns) > 1:
                ids.append(batch[columns[1]][batch["hist_mask"] & real[:, None]])
            counts[name].append(len(np.unique(np.concatenate(ids))))
    return {name: float(np.mean(c)) for name, c in counts.items()}


@contextlib.contextmanager
def per_array_psum():
    """While tracing inside the block, the train step's gradient psum runs per array (the pytree psum din_jax
    used before its flat buffer): the same sums, one gloo call per array."""
    import jax
    from din_jax import train
    original = train._psum_as_one_buffer
    train._psum_as_one_buffer = lambda tree, axis_name: jax.lax.psum(tree, axis_name)
    try:
        yield
    finally:
        train._psum_as_one_buffer = original


def worker(args) -> None:
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    from din_jax import parallel, train
    from din_jax.embedding import split_tables

    parallel.initialize(parallel.resolve_cluster())
    mesh = parallel.data_mesh()
    n, axis = mesh.size, parallel.DATA_AXIS
    local_mesh = Mesh(np.array(jax.local_devices()[:1]), (axis,))
    results = {"processes": jax.process_count(), "devices": n, "batches": {}}
    data = train.load_data(_config(args, 512), args.workdir)
    results["vocab"] = dict(data.vocabs.sizes)
    results["mean_history"] = float(np.minimum(data.train.hist_lengths, 50).mean())

    def shard_map(fn):
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=P(axis), out_specs=P(), check_vma=False))

    def per_device(tree):
        """Host arrays -> global arrays [n, ...] whose row d lives on device d (each process gives its row)."""
        sharding = NamedSharding(mesh, P(axis))
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(
            sharding, np.asarray(x)[None], (n, *np.shape(x))), tree)

    squeeze = lambda tree: jax.tree.map(lambda x: x[0], tree)  # noqa: E731
    psum = shard_map(lambda tree: jax.lax.psum(squeeze(tree), axis))
    all_gather = shard_map(lambda tree: jax.tree.map(lambda x: jax.lax.all_gather(x, axis, tiled=True),
                                                     squeeze(tree)))
    noop = shard_map(lambda x: squeeze(x) + 1)

    if n > 1:
        sweep = {str(f * 4): (psum, (per_device(np.ones([f], np.float32)),)) for f in PSUM_SWEEP_FLOATS}
        timed = interleaved_ms({"noop": (noop, (per_device(np.zeros([1], np.float32)),)), **sweep},
                               rounds=args.iters)
        results["noop_ms"] = timed.pop("noop")
        results["psum_sweep"] = [(int(k), v) for k, v in timed.items()]

    for batch_size in args.batch_sizes:
        config = _config(args, batch_size)
        trainer = train.create_trainer(config, data.vocabs.sizes, mesh)
        trainer = dataclasses.replace(trainer, pack_floor=train._pack_floor(data.train, config, trainer))
        state = trainer.init_state(config)
        items = list(itertools.islice(train._train_items(data.train, config, trainer, 0), 8))
        batches = [trainer.device_batch(trainer.prepare(item.batch, item.pack_size)) for item in items]
        b_s = batch_size // n
        p_s = batches[0]["hist_index"].shape[0] // n if "hist_index" in batches[0] else b_s * config.max_seq_length
        row = {"B": batch_size, "B_s": b_s, "P_s": p_s,
               "unique": unique_rows(data.train, batch_size, config.max_seq_length, config.seed)}
        row["hlo"] = hlo_collectives(trainer.jit_train_step.lower(state, batches[0]).compile().as_text())
        _, dense = split_tables(jax.device_get(state.params))
        row["dense_floats"] = int(sum(np.size(x) for x in jax.tree.leaves(dense)))
        row["dense_arrays"] = len(jax.tree.leaves(dense))

        # Step variants, each compiled ahead of time with its own state; their steps alternate below.
        steppers = {"step": [trainer.jit_train_step.lower(state, batches[0]).compile(), state, batches]}
        if n > 1:
            with per_array_psum():  # before: the gradient psum per array (same sums, one gloo call each); a new jit
                lowered = train.create_trainer(config, data.vocabs.sizes, mesh).jit_train_step.lower(state, batches[0])
            steppers["flat"] = [lowered.compile(), trainer.init_state(config), batches]
            row["hlo_flat"] = hlo_collectives(steppers["flat"][0].as_text())
            # This process alone on its device with its share of the same batches: no collectives.
            half = _config(args, b_s)
            solo = dataclasses.replace(train.create_trainer(half, data.vocabs.sizes, local_mesh), pack_floor=p_s)
            solo_batches = [solo.device_batch(solo.prepare(item.batch, p_s)) for item in items]
            steppers["uncoupled"] = [solo.jit_train_step.lower(solo.init_state(half), solo_batches[0]).compile(),
                                     solo.init_state(half), solo_batches]
        for entry in steppers.values():
            for i in range(3):
                entry[1], _ = entry[0](entry[1], entry[2][i])
            jax.block_until_ready(entry[1])
        times: dict[str, list[float]] = {name: [] for name in steppers}
        for i in range(args.steps):
            for name, entry in steppers.items():
                start = time.perf_counter()
                entry[1], _ = entry[0](entry[1], entry[2][i % len(batches)])
                jax.block_until_ready(entry[1])
                times[name].append(time.perf_counter() - start)
        row["step_ms"] = {name: statistics.median(t) * 1000 for name, t in times.items()}
        del steppers, state, batches

        if n > 1:
            lookups = {"uid_table": b_s, "mid_table": b_s + p_s, "cat_table": b_s + p_s}
            dense_tree = jax.tree.map(lambda x: np.ones(np.shape(x), np.float32), dense)
            loss = np.ones([], np.float32)
            rows_padded = {k: np.ones([n * v, EMBEDDING_DIM], np.float32) for k, v in lookups.items()}
            rows_unique = {k: np.ones([max(round(row["unique"][k]), 1), EMBEDDING_DIM], np.float32) for k in lookups}
            ids = {k: np.zeros([v], np.int32) for k, v in lookups.items()}
            cases = {"scalar": (psum, np.ones([], np.float32)),
                     "a": (psum, (dense_tree, loss)),
                     "a1": (psum, np.ones([row["dense_floats"] + 1], np.float32)),
                     "b": (all_gather, ids),
                     "c": (psum, rows_padded),
                     "c_unique": (psum, rows_unique),
                     "a+c": (psum, (dense_tree, rows_padded, loss))}
            row["collective_ms"] = interleaved_ms({k: (fn, (per_device(tree),)) for k, (fn, tree) in cases.items()},
                                                  rounds=args.iters)
            total_lookups = n * sum(lookups.values())
            row["bytes"] = {"scalar": 4, "a": 4 * (row["dense_floats"] + 1), "a1": 4 * (row["dense_floats"] + 1),
                            "b": 4 * total_lookups, "c": 4 * EMBEDDING_DIM * total_lookups,
                            "c_unique": sum(4 * EMBEDDING_DIM * max(round(u), 1) for u in row["unique"].values())}
            row["arrays"] = {"scalar": 1, "a": row["dense_arrays"] + 1, "a1": 1, "b": 3, "c": 3, "c_unique": 3}
        results["batches"][str(batch_size)] = row

    if parallel.is_primary():
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


# ---------------------------------------------------------------------------------------------------------
# Driver.


def _launch(num_processes: int, command: list[str], log_path: str) -> float:
    """launch.local's launch() of `command` on N processes, output to log_path; returns wall seconds."""
    from launch import local
    start = time.perf_counter()
    with open(log_path, "w") as log:
        code = local.launch(num_processes, command, out=log, cwd=_REPO)
    if code != 0:
        with open(log_path) as log:
            tail = log.readlines()[-30:]
        sys.exit(f"error: {' '.join(command[:4])} ... on {num_processes} process(es) exited with {code}; "
                 f"log {log_path}:\n{''.join(tail)}")
    return time.perf_counter() - start


def train_runs(args) -> dict[int, dict]:
    summaries = {}
    for n in (1, 2):
        workdir = os.path.join(args.workdir, f"train_{n}p")
        shutil.rmtree(workdir, ignore_errors=True)
        flags = ["--config", os.path.join(_REPO, "configs", "default.py"), "--workdir", workdir,
                 f"--config.data_dir={args.data_dir}", f"--config.synthetic.num_users={args.num_users}",
                 "--config.batch_size=512", "--config.no_eval=true", "--config.progress_bar=false"]
        wall = _launch(n, [sys.executable, "-m", "din_jax.main", *flags], workdir + ".log")
        with open(os.path.join(workdir, "train_summary.json")) as f:
            summaries[n] = {**json.load(f), "launch_seconds": wall}
    return summaries


def worker_runs(args) -> dict[int, dict]:
    out = {}
    for n in (1, 2):
        path = os.path.join(args.workdir, f"worker_{n}p.json")
        command = [sys.executable, os.path.abspath(__file__), "--role=worker", f"--workdir={args.workdir}",
                   f"--data_dir={args.data_dir}", f"--num_users={args.num_users}", f"--iters={args.iters}",
                   f"--steps={args.steps}", f"--batch_sizes={','.join(map(str, args.batch_sizes))}", f"--out={path}"]
        wall = _launch(n, command, path + ".log")
        with open(path) as f:
            out[n] = {**json.load(f), "launch_seconds": wall}
    return out


def fit_ring(sweep: list[tuple[int, float]], noop_ms: float, n: int) -> tuple[float, float]:
    """(alpha s per ring hop, beta bytes/s): alpha from the smallest psum, beta from the slope above it."""
    sweep = sorted(sweep)
    smallest_bytes, smallest_ms = sweep[0]
    alpha = max(smallest_ms - noop_ms, 0.0) / 1000 / (2 * (n - 1))
    extra = [(s - smallest_bytes, (t - smallest_ms) / 1000) for s, t in sweep[1:]]
    slope = sum(s * t for s, t in extra) / sum(s * s for s, _ in extra)  # least squares through the origin
    beta = (2 * (n - 1) / n) / slope if slope > 0 else float("inf")
    return alpha, beta


def ring_seconds(kind: str, nbytes: float, n: int, arrays: int, alpha: float, beta: float) -> float:
    """Ring model: all-reduce of / all-gather to `nbytes` in total, in `arrays` separate collectives."""
    if n == 1:
        return 0.0
    hops, share = (2 * (n - 1), 2 * (n - 1) / n) if kind == "all-reduce" else (n - 1, (n - 1) / n)
    return arrays * hops * alpha + share * nbytes / beta


def per_device_bytes(kind: str, nbytes: float, n: int) -> float:
    return (2 if kind == "all-reduce" else 1) * (n - 1) / n * nbytes


def estimate_shapes(args, n: int, batch_size: int) -> dict:
    """P (packed positions, all shards), lookups and U (unique rows) of a global batch on n devices, from the data."""
    import numpy as np

    from din_jax.packing import packed_size
    from din_jax.train import load_data
    from input_pipeline import batches as batches_lib
    config = _config(args, batch_size)
    data = load_data(config, args.workdir)
    lengths = data.train.hist_lengths
    plan = batches_lib.train_plan(data.train, batch_size, config.max_seq_length, seed=config.seed, epoch=0)
    b_s, t = batch_size // n, config.max_seq_length
    p_s = 0
    for indices, width in plan:  # as Trainer.pack_size / train._pack_floor: the epoch's fullest shard
        rows = np.zeros(batch_size, np.int64)
        rows[:len(indices)] = np.minimum(lengths[indices], width)
        p_s = max(p_s, packed_size(int(rows.reshape(n, -1).sum(axis=1).max()), config.pack_granularity, b_s * t))
    unique = unique_rows(data.train, batch_size, t, config.seed, max_batches=8)
    return {"P": n * p_s, "U": sum(unique.values()), "lookups": batch_size + 2 * (batch_size + n * p_s)}


def report(args, train: dict[int, dict], workers: dict[int, dict], seconds: float) -> None:
    print(f"\n## 1. Training throughput (din_jax.main, built-in data, {args.num_users:,} users, one epoch, "
          "global batch 512, 1 CPU device per process)\n")
    print("| processes | steps | samples/s | vs 1 process | compile s | wall s (launch to exit) |")
    print("|---|---|---|---|---|---|")
    for n, s in train.items():
        ratio = s["samples_per_sec"] / train[1]["samples_per_sec"]
        print(f"| {n} | {s['steps']} | {s['samples_per_sec']:,.0f} | {ratio:.2f}x "
              f"| {s['compile_seconds']:.1f} | {s['launch_seconds']:.1f} |")

    w1, w2 = workers[1], workers[2]
    n = w2["devices"]
    alpha, beta = fit_ring(w2["psum_sweep"], w2["noop_ms"], n)
    noop_s = w2["noop_ms"] / 1000
    print(f"\n## 2. Communication per train step, {n} processes (gloo over localhost; median of {args.iters} "
          "interleaved rounds)\n")
    print(f"Empty shard_map'd program (dispatch): {w2['noop_ms']:.3f} ms. psum of one float32 array:\n")
    print("| bytes | measured ms | ring model ms |")
    print("|---|---|---|")
    for nbytes, ms in w2["psum_sweep"]:
        modelled = (noop_s + ring_seconds("all-reduce", nbytes, n, 1, alpha, beta)) * 1000
        print(f"| {nbytes:,} | {ms:.3f} | {modelled:.3f} |")
    print(f"\nFitted ring model (N={n}): alpha = {alpha * 1e6:.0f} us per hop, beta = {beta / 1e9:.2f} GB/s.\n")
    print("| global B | B_s | P_s | (a) psum dense+loss | (a1) same, 1 buffer | (b) all_gather ids | "
          "(c) psum rows [N*L_s,18] | (c') psum rows [U,18] | (a)+(c), one psum as in the step | scalar psum |")
    print("|---|---|---|---|---|---|---|---|---|---|")

    def model_ms(row, k):
        kind = "all-gather" if k == "b" else "all-reduce"
        return (noop_s + ring_seconds(kind, row["bytes"][k], n, row["arrays"][k], alpha, beta)) * 1000

    for row in w2["batches"].values():
        ms, nb, ar = row["collective_ms"], row["bytes"], row["arrays"]
        cell = lambda k: f"{ms[k]:.2f} ms ({model_ms(row, k):.2f}), {nb[k] / 1024:,.0f} KiB in {ar[k]}"  # noqa: E731
        print(f"| {row['B']} | {row['B_s']} | {row['P_s']:,} | {cell('a')} | {cell('a1')} | {cell('b')} | {cell('c')} "
              f"| {cell('c_unique')} | {ms['a+c']:.2f} ms | {ms['scalar']:.2f} ms |")
    first = next(iter(w2["batches"].values()))
    print(f"\n(ring model in parentheses.) Dense gradients: {first['dense_floats']:,} floats in "
          f"{first['dense_arrays']} arrays. U (unique rows of a global batch, uid / mid / cat): " + "; ".join(
              f"B={row['B']}: " + " / ".join(f"{u:,.0f}" for u in row["unique"].values())
              for row in w2["batches"].values()) + f"; vocabularies {w2['vocab']}.")
    print("HLO collectives of the 2-process step: " + "; ".join(
        f"B={row['B']}: " + ", ".join(f"{v['ops']} {k} ({v['arrays']} arrays, {v['bytes'] / 1024:,.0f} KiB)"
                                      for k, v in row["hlo"].items()) for row in w2["batches"].values()) + ".")
    print(f"\nWhole train step, ms, median of {args.steps}; in each worker the variants' steps alternate (same "
          "moment, same load):\n")
    keys = list(w2["batches"])
    print("| step | " + " | ".join(f"B={k}" for k in keys) + " |")
    print("|---|" + "---|" * len(keys))
    labels = [(w1, "step", "1 process"), (w2, "step", f"{n} processes (as din_jax runs)"),
              (w2, "flat", f"{n} processes, gradient psum per array (before the flat buffer)"),
              (w2, "uncoupled", f"{n} uncoupled processes, B/{n} each, no collectives")]
    for worker_result, name, label in labels:
        print(f"| {label} | " + " | ".join(f"{worker_result['batches'][k]['step_ms'][name]:.1f}" for k in keys) + " |")
    comm = {k: sum(w2["batches"][k]["collective_ms"][c] for c in ("scalar", "b", "a+c")) for k in keys}
    print("| the step's collectives timed alone: scalar + (b) + (a)+(c) | "
          + " | ".join(f"{comm[k]:.1f}" for k in keys) + " |")
    model = {k: 1000 * sum(ring_seconds("all-gather" if c == "b" else "all-reduce", w2["batches"][k]["bytes"][c], n,
                                        w2["batches"][k]["arrays"][c], alpha, beta) for c in ("scalar", "b", "a", "c"))
             for k in keys}
    print("| ring model of those collectives | " + " | ".join(f"{model[k]:.1f}" for k in keys) + " |")
    for name, label in (("step", "as din_jax runs"), ("flat", "psum per array")):
        print(f"| (2 processes, {label}) - uncoupled, share of the step | " + " | ".join(
            f"{(lambda t: t[name] - t['uncoupled'])(w2['batches'][k]['step_ms']):.1f} "
            f"({1 - w2['batches'][k]['step_ms']['uncoupled'] / w2['batches'][k]['step_ms'][name]:.0%})"
            for k in keys) + " |")
    print("\nHLO collectives of the per-array psum: " + "; ".join(
        f"B={k}: " + ", ".join(f"{v['ops']} {c} ({v['arrays']} arrays)"
                               for c, v in w2["batches"][k]["hlo_flat"].items())
        for k in keys) + ".")

    # 3. Estimate.
    hosts, per_host = args.estimate_hosts, 512
    big_b = hosts * per_host
    row512 = w2["batches"].get(str(per_host), first)
    hlo = row512["hlo"]
    shapes = estimate_shapes(args, hosts, big_b)
    d, dense_arrays = row512["dense_floats"], row512["dense_arrays"] + 1
    scalar_arrays = max(hlo.get("all-reduce", {}).get("arrays", 0) - dense_arrays - 3, 0)
    compute_ms = w1["batches"].get(str(per_host), next(iter(w1["batches"].values())))["step_ms"]["step"]
    s_a, s_b = 4 * (d + 1), 4 * shapes["lookups"]
    s_c, s_u = 4 * EMBEDDING_DIM * shapes["lookups"], 4 * EMBEDDING_DIM * shapes["U"]
    networks = {"localhost (fit)": (beta, alpha), **{k: (bw, alpha + hop) for k, (bw, hop) in NETWORKS.items()}}
    print(f"\n## 3. Estimate: {hosts} hosts x 1 device, {per_host} examples per host (global B = {big_b:,})\n")
    print(f"From the data at B={big_b:,}, N={hosts}: P = {shapes['P']:,} packed positions (mean history "
          f"{w2['mean_history']:.1f} of T=50, padded per shard), lookups B + 2(B + P) = {shapes['lookups']:,}, "
          f"unique rows U = {shapes['U']:,.0f}; all-reduce arrays per step (HLO): {dense_arrays} dense + loss, "
          f"3 row tables, {scalar_arrays} scalar.\n")
    print("| collective | arrays | S | bytes per device per step | "
          + " | ".join(f"{k} ms" for k in networks) + " |")
    print("|---|---|---|---|" + "---|" * len(networks))
    lines = {"a": ("(a) psum dense + loss", "all-reduce", s_a, dense_arrays),
             "b": ("(b) all_gather ids", "all-gather", s_b, 3),
             "c": ("(c) psum rows [N*L_s,18], as implemented", "all-reduce", s_c, 3),
             "u": ("(c') psum rows [U,18], unique-sized", "all-reduce", s_u, 3),
             "s": ("scalar psum", "all-reduce", 4 * scalar_arrays, scalar_arrays),
             "ac": ("(a)+(c) as one flat buffer", "all-reduce", s_a + s_c, 1),
             "au": ("(a)+(c') as one flat buffer", "all-reduce", s_a + s_u, 1),
             "d": ("(d) shard_embeddings adds: psum of gathered rows", "all-reduce", s_c, 3)}
    est = {}
    for key, (label, kind, nbytes, arrays) in lines.items():
        est[key] = {k: ring_seconds(kind, nbytes, hosts, arrays, a, bw) * 1000 for k, (bw, a) in networks.items()}
        print(f"| {label} | {arrays} | {nbytes / 2**20:,.2f} MiB "
              f"| {per_device_bytes(kind, nbytes, hosts) / 2**20:,.2f} MiB | "
              + " | ".join(f"{t:.1f}" for t in est[key].values()) + " |")
    totals = {"as implemented: (a) + (b) + (c) + scalar": ("a", "b", "c", "s"),
              "one flat gradient buffer: (a)+(c) flat + (b) + scalar": ("ac", "b", "s"),
              "flat, unique-sized rows: (a)+(c') flat + (b) + scalar": ("au", "b", "s")}
    for label, parts in totals.items():
        print(f"| **total, {label}** | | | | " + " | ".join(
            f"**{sum(est[k][net] for k in parts):.1f}**" for net in networks) + " |")
    print(f"\nPer-host compute = this machine's 1-process step at B={per_host}: {compute_ms:.1f} ms. "
          f"Estimated {hosts}-host step, no overlap (1 host: {per_host / compute_ms * 1000:,.0f} samples/s):\n")
    print("| network | variant | step ms | samples/s, all hosts | vs 1 host |")
    print("|---|---|---|---|---|")
    for net in networks:
        for label, parts in totals.items():
            step_ms = compute_ms + sum(est[k][net] for k in parts)
            print(f"| {net} | {label.split(':')[0]} | {step_ms:.1f} | {big_b / step_ms * 1000:,.0f} "
                  f"| {big_b / step_ms / (per_host / compute_ms):.1f}x |")
    print(f"\nMeasured here: alpha, beta ({n} processes, localhost), dispatch, P, U, D, HLO arrays, per-host "
          "compute. Assumed for the networks: beta = line rate (1.25 / 12.5 GB/s; gloo reached "
          f"{beta / 1e9:.2f} GB/s over localhost here), alpha = the localhost alpha + 25 us (10G) / 5 us (100G) per "
          "hop. Assumed throughout: no overlap of communication and compute; per-host compute independent of N "
          "(in fact every host also sorts and updates the global batch's N*L_s rows); a collective inside the step "
          "costs what it costs alone (on this busy machine it cost more: see the (step - uncoupled) rows).")
    print(f"\nTotal benchmark time: {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/din_multiprocess")
    parser.add_argument("--data_dir", default="", help="built-in data (default WORKDIR/data; reused when there)")
    parser.add_argument("--num_users", type=int, default=20_000)
    parser.add_argument("--batch_sizes", default="512,2048")
    parser.add_argument("--iters", type=int, default=100, help="interleaved rounds timing the collectives")
    parser.add_argument("--steps", type=int, default=30, help="timed train steps per worker measurement")
    parser.add_argument("--estimate_hosts", type=int, default=10)
    parser.add_argument("--role", default="driver", choices=["driver", "worker"])
    parser.add_argument("--out", default="", help="worker: where process 0 writes its JSON")
    args = parser.parse_args()
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    args.data_dir = args.data_dir or os.path.join(args.workdir, "data")
    if args.role == "worker":
        worker(args)
        return
    os.makedirs(args.workdir, exist_ok=True)
    start = time.perf_counter()
    train = train_runs(args)
    workers = worker_runs(args)
    report(args, train, workers, time.perf_counter() - start)


if __name__ == "__main__":
    main()
