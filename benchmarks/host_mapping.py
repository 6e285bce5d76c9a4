"""Host-side id mapping of stateful embedding kinds per step, as each process does it at N processes.

    python benchmarks/host_mapping.py [--processes 1,2,4] [--per_process 256] [--batches 200] [--kind ev]

Replicated tables (din_jax.host_embeddings): every process maps the ids of the whole global batch on its host, so
that all processes' id -> row mappings stay alike without talking (train._PlanSource.next). At N processes of B
examples each, a process therefore maps N x B examples a step. This times `HostEmbeddings.map_batch` on global
batches of N x B of the built-in data in one process (the same call, the same sizes).

Split tables (`--config.shard_embeddings=true`, din_jax.owned_ids): each process sends its own B examples' ids to
their owners and maps the ids it owns. This launches N real processes (launch.local, one CPU device each, gloo
over localhost) that time `map_batch` on their own share of the same global batches, the two all_to_alls
included, with no train step running beside it; process 0 reports its median.

Both: the first --batches batches of an epoch after --warmup; median milliseconds per step and growth over N = 1.
Mapping is timed as the CPU time of the thread that maps (time.thread_time), so that N processes sharing fewer
cores do not count each other's turns; the all_to_alls as wall time (what a step waits).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import time

import jax

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere

from configs import default  # noqa: E402
from din_jax import owned_ids, train  # noqa: E402
from input_pipeline import batches as batches_lib  # noqa: E402

KINDS = {"ev": {"ev": True}, "adaptive": {"embeddings.uid": "adaptive", "embeddings.mid": "adaptive"},
         "dynamic": {"embeddings.uid": "dynamic", "embeddings.mid": "dynamic"}}


def mapping_ms(config, data, batch_size: int, batches: int, warmup: int) -> float:
    """Median CPU ms of map_batch (this thread's) over the epoch's first `batches` global batches of `batch_size`
    (after `warmup`)."""
    config.batch_size = batch_size
    trainer = train.create_trainer(config, data.vocab_sizes, raw_ids=data.raw_ids, id_sizes=data.id_sizes)
    stream = batches_lib.train_batches(data.train, batch_size, config.max_seq_length, seed=config.seed, epoch=0,
                                       keep=config.history_keep)
    times = []
    for step, batch in zip(range(warmup + batches), stream):
        start = time.thread_time()
        trainer.host.map_batch(batch, step, train=True)
        if step >= warmup:
            times.append(1e3 * (time.thread_time() - start))
    return statistics.median(times)


def owned_worker(args) -> None:
    """One process of a launch.local run: map this process's share of each global batch through the owners."""
    from din_jax import parallel
    parallel.initialize(parallel.resolve_cluster())
    mesh = parallel.data_mesh()
    config = _config(args)
    config.shard_embeddings, config.batch_size = True, args.per_process * mesh.size
    data = train.load_data(config, args.workdir)
    trainer = train.create_trainer(config, data.vocab_sizes, mesh, data.raw_ids, data.id_sizes)
    local = lambda: batches_lib.train_batches(  # noqa: E731
        data.train, config.batch_size, config.max_seq_length, seed=config.seed, epoch=0, keep=config.history_keep,
        shard_index=jax.process_index(), shard_count=jax.process_count())
    capacities = trainer.plan_capacities(itertools.islice(local(), args.warmup + args.batches))
    waited = [0.0, 0.0]  # the all_to_alls this step: wall seconds, this thread's CPU seconds

    def timed(function):  # an all_to_all started or waited for: gloo's latency and the wait for the slowest process
        def call(*args, **kwargs):
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                waited[0] += time.perf_counter() - wall
                waited[1] += time.thread_time() - cpu
        return call

    owned_ids._dispatched, owned_ids._arrived = timed(owned_ids._dispatched), timed(owned_ids._arrived)
    host, exchanges = [], []
    for step, batch in zip(range(args.warmup + args.batches), local()):
        batch = trainer.with_capacities(batch, capacities)
        waited[:], start = [0.0, 0.0], time.thread_time()
        trainer.host.map_batch(batch, step, train=True)
        if step >= args.warmup:
            host.append(1e3 * (time.thread_time() - start - waited[1]))
            exchanges.append(1e3 * waited[0])
    if parallel.is_primary():
        with open(args.out, "w") as f:
            json.dump({"exchange_ms": statistics.median(exchanges), "host_ms": statistics.median(host),
                       "owned": sorted(trainer.host.owned)}, f)


def owned_ms(args, n: int) -> dict[str, float]:
    """owned_worker's medians at n processes: exchange_ms (the wall time of map_batch's two all_to_alls) and host_ms
    (the CPU time of the rest on its thread: the mapping work on this host)."""
    from launch import local
    out = os.path.join(args.workdir, f"owned_{n}.json")
    command = [sys.executable, os.path.abspath(__file__), "--role", "worker", "--out", out, "--kind", args.kind,
               "--workdir", args.workdir, "--per_process", str(args.per_process), "--batches", str(args.batches),
               "--warmup", str(args.warmup)]
    with open(os.path.join(args.workdir, f"owned_{n}.log"), "w") as log:
        if local.launch(n, command, out=log):
            raise RuntimeError(f"worker failed: see {log.name}")
    with open(out) as f:
        return json.load(f)


def _config(args):
    config = default.get_config()
    config.update_from_flattened_dict(KINDS[args.kind])
    config.history_keep = "first"
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/din_host_mapping", help="the built-in data goes to WORKDIR/data")
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--per_process", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--kind", choices=sorted(KINDS), default="ev")
    parser.add_argument("--role", default="driver", choices=["driver", "worker"])
    parser.add_argument("--out", default="", help="worker: where process 0 writes its JSON")
    args = parser.parse_args()
    if args.role == "worker":
        owned_worker(args)
        return
    config = _config(args)
    data = train.load_data(config, args.workdir)
    print("| processes | replicated: examples mapped per process | CPU ms / step | vs 1 process "
          "| split: host CPU ms / step | vs 1 process | split: all_to_all wall ms / step |")
    print("|---|---|---|---|---|---|---|")
    base = owned_base = None
    for n in (int(p) for p in args.processes.split(",")):
        ms = mapping_ms(config, data, n * args.per_process, args.batches, args.warmup)
        owned = owned_ms(args, n)
        base, owned_base = base or ms, owned_base or owned["host_ms"]
        print(f"| {n} | {n * args.per_process} | {ms:.2f} | {ms / base:.2f}x | {owned['host_ms']:.2f} "
              f"| {owned['host_ms'] / owned_base:.2f}x | {owned['exchange_ms']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
