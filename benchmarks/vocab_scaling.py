"""Train-step time versus vocabulary size: row-sparse embedding updates against whole-table updates.

  python benchmarks/vocab_scaling.py [--rows 10000,400000,4000000] [--steps 30] [--runs adam:sparse,adam:dense]

Every table (uid, item, category) gets the given number of rows; batches are Books-shaped (history
lengths mean ~14, up to 50). Each run is optimizer:path (path `sparse`: row-sparse updates, `dense`: whole
tables). Prints ms/step of every run, the ratio largest / smallest vocabulary of each, and of every run
against the first (e.g. exact Adam against lazy Adam: `--runs lazyadam:sparse,adam:sparse`).
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from configs import default
from din_jax import train


def books_like_batch(rng: np.random.Generator, rows: int, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
    """Zipf-popular ids over `rows`, geometric history lengths (mean ~14) capped at seq_len."""
    lengths = np.minimum(rng.geometric(1 / 14, batch_size), seq_len)
    mask = np.arange(seq_len)[None] < lengths[:, None]
    ids = lambda shape: (rng.zipf(1.2, shape) % rows).astype(np.int32)  # noqa: E731
    return {"uid": rng.integers(0, rows, batch_size).astype(np.int32), "mid": ids(batch_size), "cat": ids(batch_size),
            "hist_mids": np.where(mask, ids((batch_size, seq_len)), 0).astype(np.int32),
            "hist_cats": np.where(mask, ids((batch_size, seq_len)), 0).astype(np.int32), "hist_mask": mask,
            "label": (np.arange(batch_size) % 2).astype(np.float32), "weight": np.ones(batch_size, np.float32),
            "user": np.zeros(batch_size, np.int32)}


def step_ms(rows: int, sparse: bool, steps: int, optimizer: str, batch_size: int) -> float:
    """Mean wall milliseconds of a train step after two warm-up steps."""
    config = default.get_config()
    config.update(dict(sparse_embeddings=sparse, optimizer=optimizer, batch_size=batch_size))
    trainer = train.create_trainer(config, {"uid": rows, "mid": rows, "cat": rows})
    state = trainer.init_state(config)
    rng = np.random.default_rng(0)
    batches = [books_like_batch(rng, rows, batch_size, config.max_seq_length) for _ in range(8)]
    for i in range(2):
        state, _ = trainer.train_step(state, batches[i])
    jax.block_until_ready(state)
    start = time.perf_counter()
    for i in range(steps):
        state, _ = trainer.train_step(state, batches[i % len(batches)])
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / steps * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="10000,400000,4000000")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--runs", default="lazyadam:sparse,adam:sparse,adam:dense")
    parser.add_argument("--batch_size", type=int, default=512)
    args = parser.parse_args()
    sizes = [int(r) for r in args.rows.split(",")]
    runs = [tuple(run.split(":")) for run in args.runs.split(",")]
    results = {}
    print(f"{'rows per table':>15}" + "".join(f"{o + ' ' + p + ' ms/step':>28}" for o, p in runs), flush=True)
    for rows in sizes:
        line = f"{rows:>15,}"
        for optimizer, path in runs:
            results[optimizer, path, rows] = step_ms(rows, path == "sparse", args.steps, optimizer, args.batch_size)
            line += f"{results[optimizer, path, rows]:>28.1f}"
        print(line, flush=True)
    for run in runs:
        print(f"{':'.join(run)}: largest / smallest vocabulary = "
              f"{results[(*run, sizes[-1])] / results[(*run, sizes[0])]:.2f}x")
    for run in runs[1:]:
        ratios = ", ".join(f"{results[(*run, rows)] / results[(*runs[0], rows)]:.2f}x" for rows in sizes)
        print(f"{':'.join(run)} / {':'.join(runs[0])} step time at each size: {ratios}")


if __name__ == "__main__":
    main()
