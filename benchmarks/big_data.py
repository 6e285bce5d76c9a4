"""Every-event data at Taobao scale: preparation and training throughput, peak memory, output bytes, AUC.

Generates a Taobao-format UserBehavior.csv of --rows rows with input_pipeline.behavior_log (kept under
--work_dir; or takes --csv), prepares it with `--samples every_event`, and trains DIN on it for --steps
steps then evaluates on its test split. For the "within 10%" comparison it then trains the same config for
the same steps on two smaller data sets: a log of --baseline_users users from the same generator, prepared
the same way (every-event samples: like for like, so the ratio is what the data's size costs), and the
built-in data of as many users (configs/default.py: one sample per user, short histories). Every run also
reports its samples' mean history length (positions kept, at most max_seq_length) and history positions
per second, the attention's work, which differ between the two kinds of data by ~3x. Each stage runs in
its own process, which samples its resident memory every 20 ms: `peak RSS` is the kernel's high-water
mark (VmHWM, file pages of memory-mapped columns included), `anon` the peak of the process's own memory
(RssAnon: what it cannot give back; mapped columns are page cache the kernel reclaims when it needs to).

With --ev the tables are EmbeddingVariables (--config.ev=true); the host's id mapping is timed per batch
(din_jax.host_embeddings.HostEmbeddings.map_batch) and given as its share of the step: the mapping thread's CPU
time over the step's wall time (its wall time, which also counts XLA's turns on the shared cores, in brackets).

    python benchmarks/big_data.py --rows 10_000_000                       # ~3 minutes of preparation + training
    python benchmarks/big_data.py --rows 100_150_807 --steps 2000 --ev    # Taobao's size
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import numpy as np
from absl import app, flags

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)  # run as a script from anywhere

from input_pipeline import behavior_log, events, mapped  # noqa: E402

flags.DEFINE_integer("rows", 10_000_000, "Rows of the generated UserBehavior.csv (Taobao: 100,150,807).")
flags.DEFINE_string("csv", "", "An existing UserBehavior.csv to use instead of generating one.")
flags.DEFINE_string("work_dir", "/tmp/din_big_data", "Where the log is generated (kept), prepared and trained.")
flags.DEFINE_float("test_fraction", 0.02, "--test_fraction of the preparation (the test split is evaluated whole).")
flags.DEFINE_integer("steps", 1000, "Train steps on each data set.")
flags.DEFINE_integer("batch_size", 512, "Train batch size (seed README: 512).")
flags.DEFINE_bool("ev", False, "EmbeddingVariable tables (--config.ev=true); times the host's id mapping.")
flags.DEFINE_integer("baseline_users", 50_000,
                     "Users of the comparison runs' data (a generated log and the built-in data).")
flags.DEFINE_string("stage", "", "Internal: run one stage (prepare, train) in this process and print its JSON.")
flags.DEFINE_string("stage_args", "", "Internal: the stage's arguments, as JSON.")
FLAGS = flags.FLAGS


# ---------------------------------------------------------------------------------------------
# Stages (each in its own process)


class _Memory:
    """Samples this process's RssAnon every 20 ms; its peak and the kernel's VmHWM, in bytes."""

    def __init__(self):
        self.peak_anon = 0
        threading.Thread(target=self._watch, daemon=True).start()

    def _watch(self) -> None:
        while True:
            self.peak_anon = max(self.peak_anon, _status("RssAnon"))
            time.sleep(0.02)

    def report(self) -> dict[str, int]:
        return {"peak_rss": _status("VmHWM"), "peak_anon": max(self.peak_anon, _status("RssAnon"))}


def _status(field: str) -> int:
    """One kB field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _prepare_stage(csv: str, out_dir: str, test_fraction: float) -> dict:
    """`input_pipeline.taobao.prepare` with every_event samples: its counts, seconds and memory."""
    from input_pipeline import taobao
    memory = _Memory()
    start = time.perf_counter()
    stats = taobao.prepare(csv, out_dir, samples="every_event", test_fraction=test_fraction)
    return {"seconds": time.perf_counter() - start, "behaviors": stats.behaviors, "positives": stats.positives,
            "users": stats.users, "items": stats.items, "train_pairs": stats.train_pairs,
            "test_pairs": stats.test_pairs, **memory.report()}


def _train_stage(data_dir: str, workdir: str, steps: int, batch_size: int, ev: bool, users: int) -> dict:
    """DIN on `data_dir` (or, empty, the built-in data of `users` users) for `steps` steps, then evaluated."""
    from configs import default
    from din_jax import host_embeddings, train
    memory = _Memory()
    config = default.get_config()
    config.steps, config.batch_size, config.ev = steps, batch_size, ev
    if data_dir:
        config.dataset, config.data_dir = "dien", data_dir
    else:
        config.synthetic.num_users = users
    mapping = _time_calls(host_embeddings.HostEmbeddings, "map_batch")
    history = _mean_history(train, config.max_seq_length)
    start = time.perf_counter()
    result = train.train_and_evaluate(config, workdir)
    summary = result["train"]
    return {"seconds": time.perf_counter() - start, "samples_per_sec": summary["samples_per_sec"],
            "mean_history": history["mean"],
            "compile_seconds": summary["compile_seconds"], "auc": result["eval"].get("auc"),
            "map_seconds_per_batch": mapping["seconds"] / max(mapping["calls"], 1), "map_calls": mapping["calls"],
            "map_cpu_seconds_per_batch": mapping["cpu_seconds"] / max(mapping["calls"], 1),
            **memory.report()}


def _time_calls(cls: type, name: str) -> dict[str, float]:
    """Wraps cls.name to add up its calls' wall time and the calling thread's CPU time (train batches only);
    returns the running totals. On 2 cores that XLA's threads keep busy the wall time also counts the turns
    they take while the call waits for a core; the CPU time is what the call itself costs."""
    totals = {"seconds": 0.0, "cpu_seconds": 0.0, "calls": 0}
    method = getattr(cls, name)

    def timed(self, batch, step, train, **kwargs):
        start, cpu = time.perf_counter(), time.thread_time()
        out = method(self, batch, step, train, **kwargs)
        if train:
            totals["seconds"] += time.perf_counter() - start
            totals["cpu_seconds"] += time.thread_time() - cpu
            totals["calls"] += 1
        return out

    setattr(cls, name, timed)
    return totals


def _mean_history(train_module, max_seq_length: int) -> dict[str, float]:
    """Wraps train_module.load_data to record the train split's mean history length (positions kept)."""
    result = {"mean": 0.0}
    load_data = train_module.load_data

    def measured(*args, **kwargs):
        data = load_data(*args, **kwargs)
        total = sum(int(np.minimum(lengths, max_seq_length).sum())
                    for lengths in mapped.chunks(data.train.hist_lengths))
        result["mean"] = total / max(len(data.train), 1)
        return data

    train_module.load_data = measured
    return result


STAGES = {"prepare": _prepare_stage, "train": _train_stage}


def _run_stage(stage: str, **kwargs) -> dict:
    """Runs one stage in a fresh process and returns its JSON (its last stdout line)."""
    result = subprocess.run([sys.executable, os.path.abspath(__file__), f"--stage={stage}",
                             f"--stage_args={json.dumps(kwargs)}"], cwd=REPO, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"stage {stage} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Sizes


def text_bytes(data_dir: str) -> int:
    """Bytes the prepared samples would take as DIEN text lines (untruncated histories), counted from the storage."""
    width = {kind: np.array([len(t.encode()) for t in events.read_tokens(data_dir, kind)], np.int64)
             for kind in events.TOKEN_KINDS}
    column = lambda name: events.open_column(data_dir, name)  # noqa: E731
    offsets, seq_mid, seq_cat = column("seq_offsets"), column("seq_mid"), column("seq_cat")
    entry = np.zeros(len(seq_mid) + 1, np.int64)  # running bytes of history entries (token + separator)
    for rows in events.chunks(len(seq_mid)):
        entry[rows.start + 1:rows.stop + 1] = width["mid"][seq_mid[rows]] + width["cat"][seq_cat[rows]] + 2
    np.cumsum(entry, out=entry)
    total = 0
    for split in events.SPLITS:
        user, position = column(f"{split}_user"), column(f"{split}_position")
        mid, cat = column(f"{split}_mid"), column(f"{split}_cat")
        for rows in events.chunks(len(user)):
            start = offsets[user[rows]]
            history = entry[start + position[rows]] - entry[start]
            # a 1-byte label, uid, mid, cat, two history fields, 5 tabs and a newline; no separator after the last entry
            total += int((7 + width["uid"][user[rows]] + width["mid"][mid[rows]] + width["cat"][cat[rows]]
                          + history - 2 * np.minimum(position[rows], 1)).sum())
    return total


def _directory_bytes(paths: list[str]) -> int:
    """Bytes of the files `paths`, together."""
    return sum(os.path.getsize(path) for path in paths)


# ---------------------------------------------------------------------------------------------
# Tables


def _mb(n: float) -> str:
    """Bytes as MB for the tables."""
    return f"{n / 2**20:,.0f} MB"


def _generated_log(rows: int) -> str:
    """The UserBehavior.csv of `rows` rows under --work_dir (behavior_log.taobao_spec(rows)), generated once."""
    csv = os.path.join(FLAGS.work_dir, f"log{rows}", behavior_log.TAOBAO_FILE)
    if not os.path.isfile(csv):
        start = time.perf_counter()
        behavior_log.write_taobao(os.path.dirname(csv), behavior_log.taobao_spec(rows))
        print(f"generated {csv} in {time.perf_counter() - start:.0f} s", flush=True)
    return csv


def _prepare_row(csv: str, data_dir: str) -> str:
    """Prepares `csv` into `data_dir` (every_event) and returns its row of the preparation table."""
    prep = _run_stage("prepare", csv=csv, out_dir=data_dir, test_fraction=FLAGS.test_fraction)
    stored, text = _directory_bytes(events.storage_files(data_dir)), text_bytes(data_dir)
    return (f"| {prep['behaviors']:,} | {prep['positives']:,} | {prep['users']:,} | {prep['items']:,} | "
            f"{2 * (prep['train_pairs'] + prep['test_pairs']):,} | {prep['seconds']:.0f} | "
            f"{prep['behaviors'] / prep['seconds']:,.0f} | {_mb(prep['peak_rss'])} | {_mb(stored)} | {_mb(text)} |")


def main(argv: list[str]) -> None:
    """Runs one stage (--stage), or generates, prepares, trains and prints both tables."""
    if FLAGS.stage:
        print(json.dumps(STAGES[FLAGS.stage](**json.loads(FLAGS.stage_args))))
        return
    os.makedirs(FLAGS.work_dir, exist_ok=True)
    data_dir = os.path.join(FLAGS.work_dir, "prepared")
    baseline_dir = os.path.join(FLAGS.work_dir, f"prepared_{FLAGS.baseline_users}_users")
    print("\n| rows | positives | users | items | samples | prep s | rows/s | peak RSS | output | as DIEN text |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(_prepare_row(FLAGS.csv or _generated_log(FLAGS.rows), data_dir), flush=True)
    baseline_rows = round(FLAGS.baseline_users * behavior_log.mean_rows(behavior_log.TAOBAO_SPEC))
    print(_prepare_row(_generated_log(baseline_rows), baseline_dir), flush=True)
    train_run = lambda name, **data: _run_stage(  # noqa: E731
        "train", workdir=os.path.join(FLAGS.work_dir, name), steps=FLAGS.steps, batch_size=FLAGS.batch_size,
        ev=FLAGS.ev, **data)
    users = f"{FLAGS.baseline_users // 1000}k users"
    runs = {"every-event log": train_run("train", data_dir=data_dir, users=0),
            f"every-event log, {users} (same generator)": train_run("train_baseline", data_dir=baseline_dir, users=0),
            f"built-in data, {users}": train_run("baseline", data_dir="", users=FLAGS.baseline_users)}
    like = runs[f"every-event log, {users} (same generator)"]["samples_per_sec"]
    print(f"\n{FLAGS.steps} steps of batch {FLAGS.batch_size}{', config.ev=true' if FLAGS.ev else ''}:")
    print("| data | samples/s | vs same generator | mean history | positions/s | peak RSS | anon peak | test AUC | "
          "map CPU ms/batch (wall) | map share (CPU / step) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, run in runs.items():
        step = FLAGS.batch_size / run["samples_per_sec"]
        share = run["map_cpu_seconds_per_batch"] / step if run["map_calls"] else 0.0
        print(f"| {name} | {run['samples_per_sec']:,.0f} | {run['samples_per_sec'] / like:.2f}x | "
              f"{run['mean_history']:.1f} | {run['samples_per_sec'] * run['mean_history']:,.0f} | "
              f"{_mb(run['peak_rss'])} | {_mb(run['peak_anon'])} | {run['auc']:.4f} | "
              f"{1000 * run['map_cpu_seconds_per_batch']:.2f} ({1000 * run['map_seconds_per_batch']:.2f}) | "
              f"{share:.1%} |")


if __name__ == "__main__":
    app.run(main)
