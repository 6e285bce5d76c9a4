"""din_jax against the same DIN in PyTorch and TensorFlow 2: train throughput, first step, peak RSS and test AUC.

  python benchmarks/train_throughput.py [--frameworks=din_jax,torch,tf] [--histories=books,long]
      [--batch_sizes=512] [--steps=200] [--repeats=3]

The defaults take about 15 minutes on 2 cores.

Each measurement runs in its own process (benchmarks/peers/worker.py), so peak RSS is one framework's:
din_jax in this interpreter, the peers in --peer_python (default .venv-bench, see pyproject's `bench`
extra). Throughput: Books-shaped batches (benchmarks/books_shaped.py: Books' vocabulary sizes and item
popularity) with two history shapes: 'books' (Books' short histories, mean ~14: packing sends a quarter of
the padded positions) and 'long' (like real behaviour logs, mean 154, 65% past 50: ~84% of the padded
positions are real); a ring of --distinct_batches built before timing; samples/s over --steps steps after
the first, ending on a finished step. The frameworks run one after the other, --repeats times in turn, and
each cell is the median: on a shared machine compare only numbers of one run. First step: model build,
initialisation, tracing/compilation and the first step. AUC: one epoch of the built-in data
(configs/default.py, prepared the DIEN way) at --auc_batch_size, every framework on the same batches
(histories padded to 50), test AUC with din_jax.metrics.roc_auc. Prints one markdown table; `din_jax / row`
is din_jax's (default config) samples/s over the row's, within a run.

Frameworks and how they update embedding tables ('lazy': only touched rows, moments included - LazyAdam;
'all rows': TF1 Adam, DeepRec's rule, every row decays and moves each step):
  din_jax        configs/default.py: row-sparse updates, TF1 Adam on tables (untouched rows
                 caught up in closed form), history packed (attention over real positions)  all rows
  din_jax_lazy   the same with optimizer=lazyadam (the PyTorch port's rule)                lazy
  din_jax_dense  the same with sparse_embeddings=False: TF1 Adam on whole tables           all rows
  din_jax_padded the default with pack_granularity=0: all 50 positions, as the peers       all rows
  torch          nn.Embedding(sparse=True), SparseAdam on tables, TF1 Adam elsewhere       lazy
  torch_tf1adam  nn.Embedding(sparse=True), TF1 Adam's sparse rule on tables               all rows
  torch_dense    nn.Embedding(), table-sized gradients, TF1 Adam                          all rows
  tf / tf_xla    tf.function (jit_compile=False / True), tf.compat.v1 AdamOptimizer       all rows
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np
from absl import app, flags

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)  # run as a script from anywhere

from benchmarks import books_shaped  # noqa: E402
from benchmarks.peers.worker import FRAMEWORKS  # noqa: E402
from din_jax.metrics import roc_auc  # noqa: E402

_BENCH_PYTHON = os.path.join(_REPO, ".venv-bench", "bin", "python")

flags.DEFINE_list("frameworks", ["din_jax", "din_jax_lazy", "din_jax_padded", "torch", "tf"],
                  f"Any of {', '.join(FRAMEWORKS)}; din_jax is always measured (the ratios' reference).")
flags.DEFINE_list("histories", list(books_shaped.HISTORY_SHAPES), "History shapes of the throughput runs.")
flags.DEFINE_list("batch_sizes", ["512"], "Batch sizes of the throughput runs.")
flags.DEFINE_integer("repeats", 3, "Throughput runs of every framework, in turn; cells are medians.")
flags.DEFINE_integer("steps", 200, "Timed train steps per throughput run (after the first step).")
flags.DEFINE_integer("distinct_batches", 16, "Books-shaped batches built before timing and cycled.")
flags.DEFINE_bool("auc", True, "Also train one epoch of the built-in data and compare test AUC.")
flags.DEFINE_integer("auc_batch_size", 512, "Batch size of the AUC runs (DeepRec README: 512).")
flags.DEFINE_integer("num_users", 100_000, "Users of the built-in data for the AUC runs (configs/default.py).")
flags.DEFINE_string("data_dir", os.path.join(tempfile.gettempdir(), "din_peers", "data"),
                    "Where the built-in data is generated and prepared (reused when already there).")
flags.DEFINE_string("peer_python", _BENCH_PYTHON if os.path.exists(_BENCH_PYTHON) else sys.executable,
                    "Interpreter with torch / tensorflow for the peers (din_jax runs in this one).")
flags.DEFINE_integer("threads", os.cpu_count() or 1, "Intra-op threads of the peers (XLA uses every core).")
flags.DEFINE_integer("seed", 0, "Seed of the Books-shaped batches.")
flags.DEFINE_integer("timeout", 900, "Seconds one measurement may take.")
flags.DEFINE_string("out", "", "Also write every result as JSON here.")
flags.DEFINE_float("wait_idle", 120.0, "Before each measurement, wait up to this many seconds for the other "
                   "processes on the machine to use under 0.2 cores (0: do not wait).")


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except OSError:
        return None
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def wait_until_idle(timeout: float, threshold: float = 0.2) -> float | None:
    """Waits until a 2 s window in which other processes use under `threshold` cores; that window's load."""
    deadline, load = time.monotonic() + timeout, None
    while True:
        before = _busy_seconds()
        if before is None:
            return None
        time.sleep(2.0)
        load = (_busy_seconds() - before) / 2.0
        if load < threshold or time.monotonic() > deadline:
            return load


def run_worker(framework: str, spec: dict) -> dict:
    """Runs one measurement in a fresh process; its `RESULT` line, or {'error': ...}."""
    python = sys.executable if framework.startswith("din_jax") else flags.FLAGS.peer_python
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_REPO, os.environ.get("PYTHONPATH")])))
    command = [python, "-m", "benchmarks.peers.worker", json.dumps({"framework": framework, **spec})]
    if flags.FLAGS.wait_idle > 0:
        wait_until_idle(flags.FLAGS.wait_idle)
    busy, own, wall = _busy_seconds(), _children_cpu_seconds(), time.monotonic()
    try:
        done = subprocess.run(command, cwd=_REPO, env=env, capture_output=True, text=True,
                              timeout=flags.FLAGS.timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {flags.FLAGS.timeout} s"}
    wall = time.monotonic() - wall
    # Cores other processes kept busy while the worker ran: contention that slows it down.
    other_load = None if busy is None else max(0.0, (_busy_seconds() - busy - (_children_cpu_seconds() - own)) / wall)
    for line in reversed(done.stdout.splitlines()):
        if line.startswith("RESULT "):
            return {**json.loads(line[len("RESULT "):]), "other_load": other_load}
    tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
    return {"error": f"exit {done.returncode}: {tail[0][:200]}"}


def test_auc(path: str) -> float:
    """Exact ROC AUC of the saved test probabilities, padding rows left out."""
    saved = np.load(path)
    keep = saved["weights"] > 0
    return roc_auc(saved["labels"][keep], saved["probs"][keep])


def _cell(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[dict]) -> str:
    """The markdown table of all runs.

    `din_jax / row` is the samples/s of din_jax (configs/default.py) over the row's, within a run; `other load`
    is the cores other processes kept busy during the measurement (anything well above 0 makes that row's
    timings unreliable).
    """
    lines = ["| run | framework | tables | samples/s | din_jax / row | first step s | import s | peak RSS MiB | "
             "test AUC | other load |", "|---|---|---|---|---|---|---|---|---|---|"]
    reference = {row["run"]: row.get("samples_per_sec") for row in rows if row["framework"] == "din_jax"}
    for row in rows:
        rule = FRAMEWORKS[row["framework"]]
        if "error" in row:
            lines.append(f"| {row['run']} | {row['framework']} | {rule} | error: {row['error']} | | | | | | |")
            continue
        rate, ours = row["samples_per_sec"], reference.get(row["run"])
        ratio = ours / rate if ours and rate else None
        lines.append(f"| {row['run']} | {row['framework']} | {rule} | {rate:,.0f} | {_cell(ratio, '.2f')} | "
                     f"{row['first_step_seconds']:.2f} | {row['import_seconds']:.2f} | {row['peak_rss_mib']:,.0f} | "
                     f"{_cell(row.get('test_auc'), '.4f')} | {_cell(row.get('other_load'), '.2f')} |")
    return "\n".join(lines)


def median_row(results: list[dict]) -> dict:
    """One framework's repeated measurements as one row: the run of median samples/s (an error if any failed)."""
    failed = [r for r in results if "error" in r]
    if failed:
        return failed[0]
    ordered = sorted(results, key=lambda r: r["samples_per_sec"])
    return {**ordered[(len(ordered) - 1) // 2], "repeats": [r["samples_per_sec"] for r in results]}


def throughput_rows(frameworks: list[str], log) -> list[dict]:
    """Every (batch size, history shape) run of every framework, --repeats times in turn; median rows."""
    fl = flags.FLAGS
    rows = []
    for batch_size in map(int, fl.batch_sizes):
        for history in fl.histories:
            run = f"{history} histories, batch {batch_size}, {fl.steps} steps"
            results = {framework: [] for framework in frameworks}
            for _ in range(fl.repeats):
                for framework in frameworks:
                    spec = {"task": "throughput", "batch_size": batch_size, "steps": fl.steps, "history": history,
                            "distinct_batches": fl.distinct_batches, "seed": fl.seed, "threads": fl.threads}
                    results[framework].append(run_worker(framework, spec))
                    log(f"{run} {framework}: {results[framework][-1]}")
            rows += [{"run": run, "framework": framework, **median_row(results[framework])}
                     for framework in frameworks]
    return rows


def main(argv: list[str]) -> None:
    del argv
    fl = flags.FLAGS
    unknown = sorted(set(fl.frameworks) - set(FRAMEWORKS))
    if unknown:
        raise app.UsageError(f"--frameworks: unknown {unknown}; choose from {', '.join(FRAMEWORKS)}")
    unknown = sorted(set(fl.histories) - set(books_shaped.HISTORY_SHAPES))
    if unknown:
        raise app.UsageError(f"--histories: unknown {unknown}; choose from {', '.join(books_shaped.HISTORY_SHAPES)}")
    frameworks = ["din_jax"] + [f for f in fl.frameworks if f != "din_jax"]
    start = time.perf_counter()

    def log(line: str) -> None:
        """A progress line on stderr, with the seconds since the start."""
        print(f"[{time.perf_counter() - start:6.0f} s] {line}", file=sys.stderr, flush=True)

    rows = throughput_rows(frameworks, log)
    if fl.auc:
        data_dir = books_shaped.prepare_learnable(fl.data_dir, num_users=fl.num_users)
        for framework in frameworks:
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "probs.npz")
                spec = {"task": "auc", "batch_size": fl.auc_batch_size, "data_dir": data_dir, "out": out,
                        "threads": fl.threads}
                result = run_worker(framework, spec)
                if "error" not in result:
                    result["test_auc"] = test_auc(out)
            rows.append({"run": f"built-in data ({fl.num_users:,} users), 1 epoch, batch {fl.auc_batch_size}",
                         "framework": framework, **result})
            log(rows[-1])
    print(table(rows))
    if fl.out:
        with open(fl.out, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    app.run(main)
