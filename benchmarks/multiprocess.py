"""Data-parallel training on one machine: what a train step sends per process, replicated vs sharded tables.

  python benchmarks/multiprocess.py [--processes 1,2,4] [--per_process 256] [--steps 20,40]
  python benchmarks/multiprocess.py --auc                 # 1 process (global B = 4 x 256) vs 4 sharded processes
  python benchmarks/multiprocess.py --big_rows 20000000   # 4 sharded processes, a 20M-row item table: peak RSS
  python benchmarks/multiprocess.py --placement           # numpy only: mod vs range placement, bucket balance
  python benchmarks/multiprocess.py --ev                  # every table an EmbeddingVariable: host id mappings

Every run is `python -m launch.local --num_processes N -- <din_jax.main flags>` (one CPU device per process,
gloo collectives over localhost) on the built-in default data (`--num_users`; uid and item vocabularies stay
above config.shard_min_rows, so both tables are routed under shard_embeddings; the 401-row category table
stays replicated), N x --per_process examples per global batch, `--config.no_eval=True`, no periodic
checkpoints (the final one is written, in both runs of a pair). For every N and mode (replicated tables,
`--config.shard_embeddings=true`):

(a) Loopback bytes. Each run goes in a network namespace of its own (`unshare -n`, when allowed; else the
    host's counters, which other work on the machine also moves), so the `lo` counters of /proc/net/dev count
    this run's traffic only: gloo's TCP streams and the coordinator's gRPC, with TCP/IP headers and ACKs. A
    byte sent over loopback is counted once in lo's tx and once in its rx (tx == rx); we count tx, i.e. bytes
    sent by all processes together. Two runs of S1 and S2 steps differ only by S2 - S1 steps (startup, data,
    compilation, the capacity plan, the final checkpoint and plots cancel), so
        bytes per process per step = (tx(S2) - tx(S1)) / N / (S2 - S1)
    which is also what a process receives per step, on average.
(b) HLO model. A worker launched the same way builds din_jax's Trainer as the training loop does (the epoch's
    pack floor and routing capacities, the first batch) and compiles its jitted train step; from
    `compiled.as_text()` we read every all-reduce / all-gather / all-to-all (result shapes: S bytes) and count
    the bytes one device sends, with ring algorithms (gloo's):
        all-reduce  2 (N-1)/N S     (reduce-scatter + all-gather around the ring)
        all-gather    (N-1)/N S     (S: the gathered array)
        all-to-all    (N-1)/N S     (S: one device's [N, C, ...] buffer; its own block stays home)
    (a) also holds the protocol overhead, so (a) >= (b) by some KB; a large gap would mean the model is wrong.
Step time: samples/s from the S2 run's train_summary.json (first, compiling step excluded), on this shared
2-core machine, so noisy, and N processes share 2 cores (N = 4 is slower than 1 whatever the network).

Estimate (--estimate_hosts H, one device each, --per_process examples each): the bytes per device of a step at
H from the same formulas, with the per-table lookups L (replicated: all-gather of H L ids, all-reduce of
min(H L, rows + 1) row gradients) and the capacities C(H) (sharded: N C (4 + 2 * 4 * 18) bytes per routed
table, C from sharded_tables.bucket_counts on the data's first epoch at H), the dense all-reduce as measured;
time = bytes / line rate + hops x alpha (assumed 100 us per message hop, about gloo's fitted localhost
latency; ring all-reduce 2 (H-1) hops, all-gather and all-to-all H-1), no overlap with compute, per-host
compute = the 1-process step here.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import threading
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)  # run as a script from anywhere; launch/ is not an installed package

EMBEDDING_DIM = 18
ROUTED_ROW_BYTES = 4 + 2 * 4 * EMBEDDING_DIM  # an id out, its row back, its gradient out
LINKS = {"1 Gbit/s": 1e9 / 8, "10 Gbit/s": 10e9 / 8, "100 Gbit/s": 100e9 / 8}
ALPHA_S = 100e-6
_DTYPE_BYTES = {"f32": 4, "s32": 4, "u32": 4, "f16": 2, "bf16": 2, "f64": 8, "s64": 8, "u64": 8, "pred": 1,
                "s8": 1, "u8": 1}
_KINDS = ("all-reduce", "all-gather", "all-to-all", "reduce-scatter", "collective-permute")
MODES = {"replicated": [], "sharded": ["--config.shard_embeddings=true"]}


def sent_per_device(kind: str, nbytes: float, n: int) -> float:
    """Bytes one of n devices sends for a collective of S = nbytes (see the module docstring)."""
    if n <= 1:
        return 0.0
    return {"all-reduce": 2 * (n - 1) / n, "reduce-scatter": (n - 1) / n, "collective-permute": 1.0}.get(
        kind, (n - 1) / n) * nbytes


def hlo_collectives(hlo_text: str) -> list[dict]:
    """[{kind, bytes (result shapes), shapes, computation}] of every collective in a compiled HLO module."""
    ops, computation = [], ""
    op = re.compile(r"=\s+(.+?)\s+(" + "|".join(_KINDS) + r")(-start)?\(")
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
        if header and not line.startswith(" "):
            computation = header.group(2)
        match = op.search(line)
        if not match:
            continue
        shapes = re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", match.group(1))
        if match.group(3):  # async start: (operand, result) tuple; the result is the last shape
            shapes = shapes[len(shapes) // 2:]
        nbytes = sum(_DTYPE_BYTES.get(t, 4) * _prod(dims) for t, dims in shapes)
        ops.append({"kind": match.group(2), "bytes": nbytes, "computation": computation,
                    "shapes": [f"{t}[{d}]" for t, d in shapes]})
    return ops


def _prod(dims: str) -> int:
    out = 1
    for d in filter(None, dims.split(",")):
        out *= int(d)
    return out


def _config(args, mode: str, batch_size: int):
    from configs import default
    config = default.get_config()
    config.batch_size, config.data_dir, config.synthetic.num_users = batch_size, args.data_dir, args.num_users
    config.no_eval, config.progress_bar = True, False
    config.shard_embeddings = mode == "sharded"
    config.ev = args.ev
    return config


def worker(args) -> None:
    """One process of a launch.local run: compile the train step as the loop does; process 0 writes JSON."""
    import jax
    from din_jax import parallel, train
    from din_jax.embedding import split_tables
    from din_jax.model import TABLES

    parallel.initialize(parallel.resolve_cluster())
    mesh = parallel.data_mesh()
    n = mesh.size
    config = _config(args, args.mode, args.per_process * n)
    data = train.load_data(config, args.workdir)
    trainer = train.create_trainer(config, data.vocab_sizes, mesh, data.raw_ids, data.id_sizes)
    trainer = dataclasses.replace(trainer, pack_floor=train._pack_floor(data.train, config, trainer))
    state = trainer.init_state(config)
    item = next(train._train_items(data.train, config, trainer, 0, whole=trainer.host.stateful))
    batch = trainer.host.map_batch(item.batch, 0, train=True) if trainer.host.active else item.batch
    prepared = trainer.prepare(trainer.local_share(batch) if trainer.host.stateful else batch, item.pack_size)
    hlo = trainer.jit_train_step.lower(state, trainer.device_batch(prepared)).compile().as_text()
    b_s = args.per_process
    p_s = prepared["hist_index"].shape[0] // parallel.local_shards(mesh)
    _, dense = split_tables(state.params)
    out = {"devices": n, "ops": hlo_collectives(hlo), "vocab": dict(data.vocab_sizes),
           "lookups": {"uid_table": b_s, "mid_table": b_s + p_s, "cat_table": b_s + p_s},
           "capacity": {t: prepared[t + "/capacity"].shape[0] // parallel.local_shards(mesh)
                        for t in TABLES if t + "/capacity" in prepared},
           "dense_floats": sum(x.size for x in jax.tree.leaves(dense))}
    if parallel.is_primary():
        with open(args.out, "w") as f:
            json.dump(out, f)


# ---------------------------------------------------------------------------------------------------------
# Driver.


def _lo_tx(text: str) -> int:
    """lo's transmitted bytes from /proc/net/dev text."""
    for line in text.splitlines():
        if line.strip().startswith("lo:"):
            return int(line.split(":", 1)[1].split()[8])
    raise ValueError("no lo in /proc/net/dev")


def _own_netns() -> bool:
    return subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode == 0


class _PeakRss:
    """Polls VmHWM (peak RSS) of every descendant of a process until stopped: {pid: bytes}."""

    def __init__(self, pid: int):
        import psutil
        self.root, self.peaks, self._stop = psutil.Process(pid), {}, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.3):
            try:
                children = self.root.children(recursive=True)
            except Exception:  # noqa: BLE001  the launcher has exited
                return
            for child in children:
                try:
                    if "din_jax.main" not in " ".join(child.cmdline()):
                        continue
                    with open(f"/proc/{child.pid}/status") as f:
                        hwm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))
                    self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), hwm)
                except Exception:  # noqa: BLE001  gone between listing and reading
                    pass

    def stop(self) -> list[int]:
        self._stop.set()
        self._thread.join()
        return sorted(self.peaks.values(), reverse=True)


def run_main(args, n: int, workdir: str, flags: list[str], rss: bool = False) -> dict:
    """`python -m launch.local --num_processes n -- din_jax.main ...` in its own network namespace; returns
    {tx (lo bytes sent), seconds, summary, eval, peak_rss}."""
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    launch = [sys.executable, "-m", "launch.local", "--num_processes", str(n), "--", "--workdir", workdir, *flags]
    counters = os.path.join(workdir, "net_dev.txt")
    if args.netns:
        script = ('ip link set lo up && "$@"; rc=$?; cat /proc/net/dev > "$NETDEV"; exit $rc')
        command = ["unshare", "-n", "sh", "-c", script, "sh", *launch]
    else:
        with open("/proc/net/dev") as f:
            before = _lo_tx(f.read())
        command = launch
    start = time.perf_counter()
    with open(os.path.join(workdir, "log.txt"), "w") as log:
        proc = subprocess.Popen(command, cwd=_REPO, stdout=log, stderr=subprocess.STDOUT,
                                env={**os.environ, "NETDEV": counters})
        poller = _PeakRss(proc.pid) if rss else None
        code = proc.wait()
    peaks = poller.stop() if poller else []
    seconds = time.perf_counter() - start
    if code:
        raise RuntimeError(f"exit {code}: {' '.join(launch)}; see {workdir}/log.txt")
    if args.netns:
        with open(counters) as f:
            tx = _lo_tx(f.read())
    else:
        with open("/proc/net/dev") as f:
            tx = _lo_tx(f.read()) - before
    read = lambda name: json.load(open(p)) if os.path.exists(p := os.path.join(workdir, name)) else {}  # noqa
    return {"tx": tx, "seconds": seconds, "summary": read("train_summary.json"), "eval": read("eval_metrics.json"),
            "peak_rss": peaks}


def base_flags(args, batch_size: int) -> list[str]:
    return ["--config", os.path.join(_REPO, "configs", "default.py"), f"--config.data_dir={args.data_dir}",
            f"--config.synthetic.num_users={args.num_users}",
            f"--config.batch_size={batch_size}", "--config.progress_bar=false", "--config.save_steps=0",
            "--config.log_every_steps=1000", *(["--config.ev=true"] if args.ev else [])]


def measure(args) -> dict:
    """Traffic and throughput runs, and the HLO worker, for every N and mode."""
    s1, s2 = args.steps
    results = {}
    for n in args.processes:
        for mode, extra in MODES.items():
            key = f"{n}/{mode}"
            flags = base_flags(args, n * args.per_process) + ["--config.no_eval=true", *extra]
            runs = {s: run_main(args, n, os.path.join(args.workdir, "runs", f"{n}_{mode}_{s}"),
                                flags + [f"--config.steps={s}"], rss=True) for s in (s1, s2)}
            out_file = os.path.join(args.workdir, f"hlo_{n}_{mode}.json")
            worker_cmd = [sys.executable, os.path.abspath(__file__), "--role", "worker", "--mode", mode,
                          "--out", out_file, "--workdir", args.workdir, "--data_dir", args.data_dir,
                          "--num_users", str(args.num_users), "--per_process", str(args.per_process),
                          *(["--ev"] if args.ev else [])]
            from launch import local
            with open(os.path.join(args.workdir, f"hlo_{n}_{mode}.log"), "w") as log:
                if local.launch(n, worker_cmd, out=log):
                    raise RuntimeError(f"HLO worker failed: see {log.name}")
            with open(out_file) as f:
                hlo = json.load(f)
            model = sum(sent_per_device(op["kind"], op["bytes"], n) for op in hlo["ops"])
            results[key] = {"n": n, "mode": mode, "hlo": hlo, "model_bytes": model,
                            "lo_bytes": (runs[s2]["tx"] - runs[s1]["tx"]) / n / (s2 - s1),
                            "tx": {s: r["tx"] for s, r in runs.items()},
                            "samples_per_sec": runs[s2]["summary"]["samples_per_sec"],
                            "peak_rss": runs[s2]["peak_rss"]}
            print(f"{key}: lo {results[key]['lo_bytes'] / 1e6:.3f} MB, HLO {model / 1e6:.3f} MB per process per "
                  f"step, {results[key]['samples_per_sec']:,.0f} samples/s", flush=True)
    return results


def capacities_at(args, hosts: int) -> dict[str, int]:
    """Routing capacity per routed table at `hosts` devices: the fullest owner bucket of any device shard in
    the first epoch (sharded_tables.bucket_counts, as Trainer.plan_capacities), rounded up to the granule."""
    from din_jax import sharded_tables, train
    from input_pipeline import batches as batches_lib
    config = _config(args, "sharded", hosts * args.per_process)
    data = train.load_data(config, args.workdir)
    tables = sharded_tables.routed_tables(data.vocab_sizes, config.shard_min_rows)
    rows = {t: data.vocab_sizes[t.removesuffix("_table")] for t in tables}
    fullest = dict.fromkeys(tables, 0)
    for batch in batches_lib.train_batches(data.train, config.batch_size, config.max_seq_length, seed=config.seed,
                                           epoch=0, keep=config.history_keep):
        counts = sharded_tables.bucket_counts(batch, tables, rows, hosts, hosts)
        fullest = {t: max(fullest[t], counts[t]) for t in tables}
    return {t: sharded_tables.round_capacity(c) for t, c in fullest.items()}


def estimate(args, results: dict) -> None:
    """Bytes and communication time per device per step at --estimate_hosts, both modes (module docstring)."""
    h = args.estimate_hosts
    ref_n = max(args.processes)
    print(f"\n## Estimate: {h} hosts x 1 device, {args.per_process} examples each "
          f"(global B = {h * args.per_process:,})\n")
    print("| mode | collective | ops | S bytes | bytes sent per device | "
          + " | ".join(f"{k} ms" for k in LINKS) + " |")
    print("|---|---|---|---|---|" + "---|" * len(LINKS))
    caps = capacities_at(args, h)
    totals = {}
    for mode in MODES:
        ref = results[f"{ref_n}/{mode}"]["hlo"]
        dense = 4 * (ref["dense_floats"] + 1)
        lookups, vocab = ref["lookups"], ref["vocab"]
        small = [op for op in ref["ops"] if op["bytes"] <= 64]  # scalar psums: counts, norms
        if mode == "replicated":
            ids = 4 * h * sum(lookups.values())
            rows = 4 * EMBEDDING_DIM * sum(min(h * v, vocab[t.removesuffix("_table")] + 1) for t, v in lookups.items())
            parts = [("all-gather ids", "all-gather", 3, ids),
                     ("all-reduce dense + rows", "all-reduce", 1, dense + rows)]
        else:
            routed = sum(h * c * ROUTED_ROW_BYTES for c in caps.values())
            cat = 4 * (EMBEDDING_DIM + 1) * (vocab["cat"])
            parts = [(f"all-to-all, C = {caps}", "all-to-all", 3 * len(caps), routed),
                     ("all-reduce dense + cat table", "all-reduce", 1, dense + cat)]
        parts.append(("scalar all-reduces", "all-reduce", len(small), 4 * len(small)))
        totals[mode] = {k: 0.0 for k in LINKS}
        for label, kind, ops, nbytes in parts:
            sent = sent_per_device(kind, nbytes, h)
            hops = 2 * (h - 1) if kind == "all-reduce" else h - 1
            ms = {k: (sent / bw + ops * hops * ALPHA_S) * 1000 for k, bw in LINKS.items()}
            for k in LINKS:
                totals[mode][k] += ms[k]
            print(f"| {mode} | {label} | {ops} | {nbytes / 1e6:.3f} MB | {sent / 1e6:.3f} MB | "
                  + " | ".join(f"{t:.1f}" for t in ms.values()) + " |")
        print(f"| {mode} | **total** | | | | " + " | ".join(f"**{t:.1f}**" for t in totals[mode].values()) + " |")
    print(f"\nPer-host compute = the 1-process step here; {h}-host step = compute + communication (no overlap):\n")
    print("| mode | 1-process step ms | " + " | ".join(f"{k}: step ms, x 1 host" for k in LINKS) + " |")
    print("|---|---|" + "---|" * len(LINKS))
    for mode in MODES:
        one = results.get(f"1/{mode}")
        if not one:
            continue
        compute = args.per_process / one["samples_per_sec"] * 1000
        print(f"| {mode} | {compute:.1f} | " + " | ".join(
            f"{compute + t:.1f}, {h * compute / (compute + t):.1f}x" for t in totals[mode].values()) + " |")


def report(args, results: dict) -> None:
    s1, s2 = args.steps
    print(f"\n## Bytes per process per step, {args.per_process} examples per process "
          f"(loopback: (tx({s2}) - tx({s1})) / N / {s2 - s1}; HLO: ring model of the compiled step)\n")
    print("| processes | tables | loopback MB | HLO model MB | loopback / HLO | HLO collectives (ops: MB of S) "
          "| step ms | samples/s | peak RSS per process, GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results.values():
        kinds = {}
        for op in r["hlo"]["ops"]:
            count, total = kinds.get(op["kind"], (0, 0))
            kinds[op["kind"]] = (count + 1, total + op["bytes"])
        cols = ", ".join(f"{k} {c}: {b / 1e6:.3f}" for k, (c, b) in kinds.items()) or "none"
        ratio = f"{r['lo_bytes'] / r['model_bytes']:.2f}" if r["model_bytes"] else "-"
        step_ms = r["n"] * args.per_process / r["samples_per_sec"] * 1000
        print(f"| {r['n']} | {r['mode']} | {r['lo_bytes'] / 1e6:.3f} | {r['model_bytes'] / 1e6:.3f} | {ratio} | "
              f"{cols} | {step_ms:.1f} | {r['samples_per_sec']:,.0f} | "
              f"{max(r['peak_rss'], default=0) / 1e9:.2f} |")
    capacities = {k: r["hlo"]["capacity"] for k, r in results.items() if r["hlo"]["capacity"]}
    first = next(iter(results.values()))["hlo"]
    print(f"\nCapacities C per routed table: {capacities}; lookups per device L: {first['lookups']}; "
          f"vocabularies {first['vocab']}.")
    if args.estimate_hosts:
        estimate(args, results)


def auc_check(args) -> None:
    """One epoch: 1 process at global B = 4 x per_process vs 4 processes with sharded tables; test AUC each."""
    b = 4 * args.per_process
    flags = base_flags(args, b)
    one = run_main(args, 1, os.path.join(args.workdir, "auc_1"), flags)
    four = run_main(args, 4, os.path.join(args.workdir, "auc_4"), flags + MODES["sharded"])
    a1, a4 = one["eval"]["auc"], four["eval"]["auc"]
    print(f"\n## AUC, one epoch, global batch {b}\n\n| run | steps | test AUC | samples/s |\n|---|---|---|---|")
    for label, r in (("1 process", one), ("4 processes, shard_embeddings", four)):
        print(f"| {label} | {r['summary']['steps']} | {r['eval']['auc']:.5f} "
              f"| {r['summary']['samples_per_sec']:,.0f} |")
    print(f"\n|AUC(4) - AUC(1)| = {abs(a4 - a1):.2e}")


def big_table(args) -> None:
    """4 processes, shard_embeddings, the item vocabulary padded to --big_rows ids (one unused token with id
    big_rows - 1 in a pickled vocabulary: the table has max id + 1 rows); peak RSS per process."""
    from din_jax import train
    from input_pipeline import dien
    config = _config(args, "sharded", 4 * args.per_process)
    source = train.load_data(config, args.workdir).data_dir
    big = os.path.join(args.workdir, f"data_mid{args.big_rows}")
    os.makedirs(big, exist_ok=True)
    for name in (dien.TRAIN_FILE, dien.TEST_FILE, "uid_voc.txt", "cat_voc.txt"):
        if not os.path.exists(os.path.join(big, name)):
            os.symlink(os.path.join(os.path.abspath(source), name), os.path.join(big, name))
    vocab = dien.load_vocab(dien.find_vocab(source, "mid"))
    vocab["__unused_pad__"] = args.big_rows - 1
    with open(os.path.join(big, "mid_voc.pkl"), "wb") as f:
        pickle.dump(vocab, f)
    flags = ["--config", os.path.join(_REPO, "configs", "default.py"), f"--config.data_dir={big}",
             "--config.dataset=dien", f"--config.batch_size={4 * args.per_process}",
             "--config.progress_bar=false", "--config.no_eval=true", f"--config.steps={args.big_steps}",
             *MODES["sharded"]]
    table = args.big_rows * EMBEDDING_DIM * 4
    for n in (4,):
        r = run_main(args, n, os.path.join(args.workdir, f"big_{n}"), flags, rss=True)
        print(f"\n## {args.big_rows:,}-row item table, {n} processes, shard_embeddings, {args.big_steps} steps\n")
        print(f"Item table {table / 1e9:.2f} GB (+ 2 Adam slots: {3 * table / 1e9:.2f} GB); per device "
              f"{3 * table / n / 1e9:.2f} GB. Peak RSS per process: "
              + ", ".join(f"{p / 1e9:.2f} GB" for p in r["peak_rss"])
              + f"; {r['summary']['samples_per_sec']:,.0f} samples/s; wall {r['seconds']:.0f} s.")


def placement(args) -> None:
    """Mod vs range placement on the data's uid / item ids: max owner bucket / mean, per device shard."""
    import numpy as np
    from din_jax import sharded_tables, train
    from din_jax.embedding import table_ids_host
    from input_pipeline import batches as batches_lib
    print("\n## Placement balance: max owner bucket / mean bucket of a device's unique ids "
          f"({args.placement_batches} batches of N x {args.per_process})\n")
    print("| N | table | mod: mean over batches | mod: worst | range: mean over batches | range: worst |")
    print("|---|---|---|---|---|---|")
    for n in (2, 4, 10):
        config = _config(args, "sharded", n * args.per_process)
        data = train.load_data(config, args.workdir)
        stats = {}
        batches = batches_lib.train_batches(data.train, config.batch_size, config.max_seq_length, seed=config.seed,
                                            epoch=0, keep=config.history_keep)
        for _, batch in zip(range(args.placement_batches), batches):
            for table in ("uid_table", "mid_table"):
                rows = data.vocab_sizes[table.removesuffix("_table")]
                q = sharded_tables.rows_per_shard(rows, n)
                size = batch["weight"].shape[0] // n
                for k in range(n):
                    shard = {c: v[k * size:(k + 1) * size] for c, v in batch.items()}
                    ids = np.unique(table_ids_host(shard, table, rows))
                    ids = ids[ids < rows]
                    if not len(ids):  # a shard of the epoch's padded last batch
                        continue
                    for name, owner in (("mod", ids % n), ("range", ids // q)):
                        counts = np.bincount(owner, minlength=n)
                        stats.setdefault((table, name), []).append(counts.max() / counts.mean())
        for table in ("uid_table", "mid_table"):
            mod, rng = np.array(stats[(table, "mod")]), np.array(stats[(table, "range")])
            print(f"| {n} | {table} | {mod.mean():.2f} | {mod.max():.2f} | {rng.mean():.2f} | {rng.max():.2f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/din_multiprocess")
    parser.add_argument("--data_dir", default="", help="built-in data (default WORKDIR/data; reused when there)")
    parser.add_argument("--num_users", type=int, default=100_000)
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--per_process", type=int, default=256, help="examples per process per step")
    parser.add_argument("--steps", default="20,40", help="S1,S2: step counts of the two runs differenced")
    parser.add_argument("--estimate_hosts", type=int, default=10)
    parser.add_argument("--auc", action="store_true", help="only the AUC check (1 vs 4 processes, one epoch)")
    parser.add_argument("--big_rows", type=int, default=0, help="only the big-table run with this many item rows")
    parser.add_argument("--big_steps", type=int, default=5)
    parser.add_argument("--placement", action="store_true", help="only the mod vs range placement balance")
    parser.add_argument("--placement_batches", type=int, default=200)
    parser.add_argument("--ev", action="store_true", help="every table an EmbeddingVariable (--config.ev=true): "
                        "replicated, every process maps the whole global batch; sharded, the ids' owners map them")
    parser.add_argument("--role", default="driver", choices=["driver", "worker"])
    parser.add_argument("--mode", default="replicated", choices=list(MODES))
    parser.add_argument("--out", default="", help="worker: where process 0 writes its JSON")
    args = parser.parse_args()
    args.processes = [int(n) for n in args.processes.split(",")]
    args.steps = tuple(int(s) for s in args.steps.split(","))
    args.data_dir = os.path.abspath(args.data_dir or os.path.join(args.workdir, "data"))
    if args.role == "worker":
        worker(args)
        return
    os.makedirs(args.workdir, exist_ok=True)
    args.netns = _own_netns()
    print(f"Loopback counters: {'a network namespace per run' if args.netns else 'the host (shared: noisy)'}")
    start = time.perf_counter()
    if args.placement:
        placement(args)
    elif args.auc:
        auc_check(args)
    elif args.big_rows:
        big_table(args)
    else:
        report(args, measure(args))
    print(f"\nTotal benchmark time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
