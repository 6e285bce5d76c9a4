"""One measurement in its own process, so that peak RSS is one framework's: `python -m benchmarks.peers.worker SPEC`.

SPEC is JSON: framework (a key of FRAMEWORKS), task ('throughput' or 'auc'), batch_size, threads, and:
  throughput: steps, distinct_batches, seed, history ('books' or 'long', books_shaped.HISTORY_SHAPES) - a
      ring of `distinct_batches` Books-shaped batches (benchmarks/books_shaped.py), built before timing; one
      first step (build, init, trace/compile);
      then `steps` timed steps, ending on a finished step.
  auc: data_dir, out - one epoch of the prepared built-in data in din_jax's batch order, then the test
      split's click probabilities written to `out` (.npz: probs, labels, weights).
The last line printed is `RESULT <json>`: samples_per_sec, first_step_seconds, import_seconds, peak_rss_mib, ...
Imports only numpy, input_pipeline and the one framework measured.
"""

from __future__ import annotations

import json
import resource
import sys
import time
import warnings
from typing import Any

import numpy as np

from benchmarks import books_shaped
from input_pipeline import batches as batches_lib

MAX_SEQ_LENGTH = 50
EVAL_BATCH_SIZE = 2048
DIN_JAX_SEED = 2021  # configs/default.py: parameters and data order
# How each framework updates the embedding tables: 'lazy' = only touched rows (moments included),
# 'all rows' = TF1 Adam, every row's moments decay and every row moves (DeepRec's Adam).
FRAMEWORKS = {"din_jax": "all rows", "din_jax_lazy": "lazy", "din_jax_dense": "all rows", "din_jax_padded": "all rows",
              "torch": "lazy", "torch_tf1adam": "all rows", "torch_dense": "all rows", "tf": "all rows",
              "tf_xla": "all rows"}
# configs/default.py overrides of the din_jax variants.
DIN_JAX_OVERRIDES = {"din_jax": {}, "din_jax_lazy": {"optimizer": "lazyadam"},
                     "din_jax_dense": {"sparse_embeddings": False}, "din_jax_padded": {"pack_granularity": 0}}


class DinJax:
    """din_jax's own Trainer (create_trainer / init_state / train_step) behind the adapter interface."""

    def __init__(self, vocab_sizes: dict[str, int], batch_size: int, overrides: dict[str, Any],
                 history_lengths: list[np.ndarray]):
        """Builds the jitted steps and a fresh state for configs/default.py at `batch_size`.

        As din_jax's training loop does, packed histories get one size that fits every batch to come
        (`history_lengths`: each batch's lengths), so the step compiles once.
        """
        import dataclasses
        import jax
        from configs import default
        from din_jax import packing, train
        self._jax = jax
        self.config = default.get_config()
        self.config.batch_size = batch_size
        self.config.update(overrides)
        trainer = train.create_trainer(self.config, vocab_sizes)
        if trainer.pack_granularity:
            floor = packing.epoch_pack_size(history_lengths, trainer.pack_granularity,
                                            batch_size * self.config.max_seq_length)
            trainer = dataclasses.replace(trainer, pack_floor=floor)
        self.trainer = trainer
        self.state = self.trainer.init_state(self.config)
        self._readable = None  # the state as evaluation reads it (exact Adam's lagging rows caught up), once

    def train_step(self, batch: dict[str, np.ndarray]) -> None:
        """Dispatches one step (asynchronously)."""
        self.state, _ = self.trainer.train_step(self.state, batch)
        self._readable = None

    def sync(self) -> None:
        """Waits for every dispatched step."""
        self._jax.block_until_ready(self.state)

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Click probabilities [B]."""
        if self._readable is None:
            self._readable = self.trainer.readable(self.state)
        return np.asarray(self.trainer.eval_step(self._readable, batch))


class Peer:
    """A peer Trainer (benchmarks/peers/{torch,tf}_din.py); its steps are synchronous."""

    def __init__(self, framework: str, vocab_sizes: dict[str, int], threads: int):
        """Imports the peer module, sets its threads and builds its Trainer."""
        if framework.startswith("torch"):
            from benchmarks.peers import torch_din as module
            grads = {"torch": "lazy", "torch_tf1adam": "sparse", "torch_dense": "dense"}[framework]
            module.set_threads(threads)
            self.trainer = module.Trainer(vocab_sizes, embedding_grads=grads)
        else:
            from benchmarks.peers import tf_din as module
            module.set_threads(threads)
            self.trainer = module.Trainer(vocab_sizes, jit_compile=framework == "tf_xla")

    def train_step(self, batch: dict[str, np.ndarray]) -> None:
        """Runs one step."""
        self.trainer.train_step(batch)

    def sync(self) -> None:
        """Nothing is pending."""

    def predict(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        """Click probabilities [B]."""
        return self.trainer.predict(batch)


def _import_framework(framework: str) -> float:
    """Imports the framework's package; returns the seconds it took."""
    start = time.perf_counter()
    if framework.startswith("din_jax"):
        import din_jax.train  # noqa: F401
    elif framework.startswith("torch"):
        import torch  # noqa: F401
    else:
        from benchmarks.peers import tf_din  # noqa: F401 - sets TF's log level before importing it
    return time.perf_counter() - start


def _build(framework: str, vocab_sizes: dict[str, int], batch_size: int, threads: int,
           history_lengths: list[np.ndarray]):
    """The adapter for `framework`; `history_lengths` holds each coming batch's history lengths."""
    if framework.startswith("din_jax"):  # XLA:CPU uses every core
        return DinJax(vocab_sizes, batch_size, DIN_JAX_OVERRIDES[framework], history_lengths)
    return Peer(framework, vocab_sizes, threads)


def _peak_rss_mib() -> float:
    """This process's peak resident set size since it started its program.

    Linux keeps ru_maxrss across fork and execve, so getrusage would report at least the parent's
    size at the fork; VmHWM in /proc/self/status belongs to this program's own address space.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def throughput(spec: dict[str, Any]) -> dict[str, Any]:
    """First-step seconds and samples/s over `steps` further steps on a ring of Books-shaped batches."""
    batch_size, ring_size = spec["batch_size"], spec["distinct_batches"]
    split = books_shaped.books_shaped_split(num_pairs=-(-ring_size * batch_size // 2), seed=spec["seed"],
                                            history=books_shaped.HISTORY_SHAPES[spec["history"]])
    ring = list(batches_lib.train_batches(split, batch_size, MAX_SEQ_LENGTH, seed=spec["seed"], epoch=0))[:ring_size]
    del split
    import_seconds = _import_framework(spec["framework"])
    start = time.perf_counter()
    model = _build(spec["framework"], books_shaped.BOOKS_VOCAB_SIZES, batch_size, spec["threads"],
                   [batch["hist_mask"].sum(1) for batch in ring])
    model.train_step(ring[0])
    model.sync()
    first = time.perf_counter()
    for step in range(1, spec["steps"] + 1):
        model.train_step(ring[step % ring_size])
    model.sync()
    end = time.perf_counter()
    return {"samples_per_sec": spec["steps"] * batch_size / (end - first), "first_step_seconds": first - start,
            "timed_seconds": end - first, "import_seconds": import_seconds, "peak_rss_mib": _peak_rss_mib()}


def auc(spec: dict[str, Any]) -> dict[str, Any]:
    """One epoch on the prepared built-in data, then test-split probabilities saved to spec['out']."""
    data = books_shaped.learnable_split(spec["data_dir"])
    batch_size = spec["batch_size"]
    import_seconds = _import_framework(spec["framework"])
    start = time.perf_counter()
    lengths = np.minimum(data.train.hist_lengths, MAX_SEQ_LENGTH)
    plan = batches_lib.train_plan(data.train, batch_size, MAX_SEQ_LENGTH, seed=DIN_JAX_SEED, epoch=0)
    model = _build(spec["framework"], data.vocab_sizes, batch_size, spec["threads"],
                   [lengths[indices] for indices, _ in plan])
    batches = batches_lib.train_batches(data.train, batch_size, MAX_SEQ_LENGTH, seed=DIN_JAX_SEED, epoch=0)
    first_batch = next(batches)
    model.train_step(first_batch)
    model.sync()
    first = time.perf_counter()
    samples = 0
    for batch in batches:
        model.train_step(batch)
        samples += int(batch["weight"].sum())
    model.sync()
    end = time.perf_counter()
    probs, labels, weights = [], [], []
    for batch in batches_lib.eval_batches(data.test, EVAL_BATCH_SIZE, MAX_SEQ_LENGTH):
        probs.append(model.predict(batch))
        labels.append(batch["label"])
        weights.append(batch["weight"])
    np.savez(spec["out"], probs=np.concatenate(probs), labels=np.concatenate(labels), weights=np.concatenate(weights))
    return {"samples_per_sec": samples / (end - first), "first_step_seconds": first - start,
            "timed_seconds": end - first, "import_seconds": import_seconds, "peak_rss_mib": _peak_rss_mib(),
            "train_examples": len(data.train)}


def main(argv: list[str]) -> None:
    """Runs the SPEC given as the only argument and prints `RESULT <json>`."""
    if len(argv) != 2:
        raise SystemExit(f"usage: python -m benchmarks.peers.worker SPEC_JSON  ({__doc__.splitlines()[0]})")
    spec = json.loads(argv[1])
    if spec["framework"] not in FRAMEWORKS:
        raise SystemExit(f"framework must be one of {sorted(FRAMEWORKS)}, got {spec['framework']!r}")
    warnings.filterwarnings("ignore", category=UserWarning)  # torch's non-writable numpy array notice
    result = {"throughput": throughput, "auc": auc}[spec["task"]](spec)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv)
