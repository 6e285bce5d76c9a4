"""Host-side id mapping of stateful embedding kinds per step, as each process does it at N processes.

    python benchmarks/host_mapping.py [--processes 1,2,4] [--per_process 256] [--batches 200] [--kind ev]

With EmbeddingVariable, adaptive or dynamic tables (din_jax.host_embeddings), every process maps the ids of
the whole global batch on its host, so that all processes' id -> row mappings stay alike without talking
(train._EpochSource.next). At N processes of B examples each, a process therefore maps N x B examples a
step. This times `HostEmbeddings.map_batch` on global batches of N x B of the built-in data in one process
(the same call, the same sizes), the first --batches batches of an epoch after --warmup, and prints the median
milliseconds per step and its growth over N = 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere

from configs import default  # noqa: E402
from din_jax import train  # noqa: E402
from input_pipeline import batches as batches_lib  # noqa: E402

KINDS = {"ev": {"ev": True}, "adaptive": {"embeddings.uid": "adaptive", "embeddings.mid": "adaptive"},
         "dynamic": {"embeddings.uid": "dynamic", "embeddings.mid": "dynamic"}}


def mapping_ms(config, data, batch_size: int, batches: int, warmup: int) -> float:
    """Median ms of map_batch over the epoch's first `batches` global batches of `batch_size` (after `warmup`)."""
    config.batch_size = batch_size
    trainer = train.create_trainer(config, data.vocab_sizes, raw_ids=data.raw_ids, id_sizes=data.id_sizes)
    stream = batches_lib.train_batches(data.train, batch_size, config.max_seq_length, seed=config.seed, epoch=0,
                                       keep=config.history_keep)
    times = []
    for step, batch in zip(range(warmup + batches), stream):
        start = time.perf_counter()
        trainer.host.map_batch(batch, step, train=True)
        if step >= warmup:
            times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/din_host_mapping", help="the built-in data goes to WORKDIR/data")
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--per_process", type=int, default=256)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--kind", choices=sorted(KINDS), default="ev")
    args = parser.parse_args()
    config = default.get_config()
    config.update_from_flattened_dict(KINDS[args.kind])
    config.history_keep = "first"
    data = train.load_data(config, args.workdir)
    print(f"| processes | global batch mapped per process | {args.kind} map_batch ms / step | vs 1 process |")
    print("|---|---|---|---|")
    base = None
    for n in (int(p) for p in args.processes.split(",")):
        ms = mapping_ms(config, data, n * args.per_process, args.batches, args.warmup)
        base = base or ms
        print(f"| {n} | {n * args.per_process} | {ms:.2f} | {ms / base:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
