"""The PNGs of a run in WORKDIR/plots: train loss, test AUC/GAUC, throughput, and the attention weights.

The training loop appends (append_history) to WORKDIR/history.jsonl one JSON object a line, of two kinds:
  {"step": 50, "loss": 0.61, "samples_per_sec": 51234.0}               a train log point
  {"step": 100, "eval": {"auc": 0.79, "gauc": 0.80, "logloss": 0.54}}  an evaluation
and draws the plots once at the end of the run; `python -m din_jax.plots --workdir W` redraws them
from W/history.jsonl. Figures are drawn on matplotlib's Agg canvas (no display, no pyplot state).
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any, Callable, Sequence

import numpy as np
from absl import app, flags, logging
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from din_jax import jsonfile
from input_pipeline.textio import atomic_write

HISTORY_FILE = "history.jsonl"
PLOTS_DIR = "plots"
FIGSIZE = (6.4, 4.0)  # inches; at DPI, a 640 x 400 PNG
DPI = 100


def append_history(workdir: str, record: dict[str, Any]) -> None:
    """Appends `record` as one line to WORKDIR/history.jsonl, on a line of its own.

    A run that crashed mid-line leaves the file without its final newline; the resumed run's
    first record then starts a new line instead of gluing onto the cut one.
    """
    path = os.path.join(workdir, HISTORY_FILE)
    line = jsonfile.dumps(record).encode() + b"\n"
    with open(path, "ab+") as f:
        if f.seek(0, os.SEEK_END):
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                line = b"\n" + line
        f.write(line)


def drop_history(workdir: str, drop: Callable[[dict[str, Any]], bool]) -> None:
    """Rewrites WORKDIR/history.jsonl (atomically) without the records for which `drop` is true, if there are any."""
    history = read_history(workdir)
    if any(drop(record) for record in history):
        with atomic_write(os.path.join(workdir, HISTORY_FILE), "w") as f:
            f.writelines(jsonfile.dumps(r) + "\n" for r in history if not drop(r))


def read_history(workdir: str) -> list[dict[str, Any]]:
    """The records of WORKDIR/history.jsonl in file order; [] when there is none.

    A line that is not a JSON object (the last line of a run that crashed while writing it, which a
    resumed run may have appended to) is skipped with a warning naming file:line.
    """
    path = os.path.join(workdir, HISTORY_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.readlines()
    except FileNotFoundError:
        return []
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
        else:
            logging.warning("%s:%d: not a history record (cut short by a crash?); skipped", path, number)
    return records


def series(history: Sequence[dict[str, Any]], key: str, section: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of record[key] (record[section][key] when `section` is given), by step.

    Records without a finite value are left out; when a step appears more than once (a resumed run
    logs again the steps after its last checkpoint), its last record wins.
    """
    by_step = {}
    for record in history:
        fields = record.get(section) if section else record
        value = fields.get(key) if isinstance(fields, dict) else None
        if isinstance(value, (int, float)) and math.isfinite(value):
            by_step[int(record["step"])] = float(value)
    steps = np.array(sorted(by_step), np.int64)
    return steps, np.array([by_step[s] for s in steps], np.float64)


def real_attention_weights(weights: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The attention weights [B, T] at the real history positions (`mask` [B, T] True), flattened row by row."""
    weights, mask = _weights_and_mask(weights, mask)
    return weights[mask]


def _weights_and_mask(weights: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Attention weights as float32 and the history mask as bool, checked to be both [B, T]."""
    weights, mask = np.asarray(weights, np.float32), np.asarray(mask, bool)
    if weights.shape != mask.shape or weights.ndim != 2:
        raise ValueError(f"attention weights {weights.shape} and history_mask {mask.shape} must both be [B, T]")
    return weights, mask


def write_run_plots(workdir: str, history: Sequence[dict[str, Any]], attention_weights: np.ndarray | None = None,
                    history_mask: np.ndarray | None = None) -> list[str]:
    """Writes WORKDIR/plots/{loss,auc,throughput,attention}.png and returns the paths written.

    A plot without data is not written (no evaluation: no auc.png; no attention_weights: no
    attention.png). attention_weights [B, T] come with history_mask [B, T] (True at real positions);
    only the real positions are binned. Each PNG replaces the old one atomically.
    """
    if (attention_weights is None) != (history_mask is None):
        raise ValueError("write_run_plots: pass attention_weights and history_mask together, or neither")
    figures = {"loss": _loss_figure(history), "auc": _auc_figure(history),
               "throughput": _throughput_figure(history)}
    if attention_weights is not None:
        figures["attention"] = _attention_histogram(real_attention_weights(attention_weights, history_mask))
    paths = []
    for name, figure in figures.items():
        if figure is not None:
            paths.append(os.path.join(workdir, PLOTS_DIR, f"{name}.png"))
            with atomic_write(paths[-1], "wb") as f:
                figure.savefig(f, format="png", dpi=DPI)
    return paths


def attention_heatmap(weights: np.ndarray, mask: np.ndarray, items: Sequence[Sequence[Any]] | None = None,
                      ax: Axes | None = None, row_labels: Sequence[str] | None = None) -> Figure:
    """A heatmap of the attention weights of a few examples (rows) over their history positions (columns).

    weights, mask: [U, T]; padded positions stay blank and columns past the longest history are cut.
    items: optional labels of the history positions (e.g. their category tokens), items[u][t] for
    each real position, written in its cell. row_labels: optional [U] names of the rows.
    Draws into `ax` when given, else into a new figure; returns the figure.
    """
    weights, mask = _weights_and_mask(weights, mask)
    columns = np.flatnonzero(mask.any(axis=0))
    width = int(columns[-1]) + 1 if columns.size else 1
    shown, real = weights[:, :width], mask[:, :width]
    if ax is None:
        ax = _figure(figsize=(min(max(FIGSIZE[0], 2.5 + 0.3 * width), 16.0), 1.6 + 0.5 * len(weights))).add_subplot()
    image = ax.imshow(np.ma.masked_array(shown, ~real), aspect="auto", cmap="viridis", vmin=0.0,
                      interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, label="attention weight")
    ax.set_xlabel("history position (oldest first)")
    ax.set_yticks(range(len(weights)), row_labels if row_labels is not None else range(len(weights)))
    if items is not None:
        brightest = float(shown[real].max(initial=0.0))
        for row, column in zip(*np.nonzero(real)):
            dark = shown[row, column] < 0.6 * brightest
            ax.text(column, row, str(items[row][column]), ha="center", va="center", fontsize=7,
                    color="white" if dark else "black")
    return ax.figure


def _figure(figsize: tuple[float, float] = FIGSIZE) -> Figure:
    """A figure on the Agg canvas."""
    figure = Figure(figsize=figsize, dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _loss_figure(history: Sequence[dict[str, Any]]) -> Figure | None:
    """Train loss at the log points, with the test logloss of each evaluation when there is one."""
    steps, loss = series(history, "loss")
    if not steps.size:
        return None
    figure = _figure()
    ax = figure.add_subplot()
    ax.plot(steps, loss, label="train loss (last batch)")
    eval_steps, logloss = series(history, "logloss", "eval")
    if eval_steps.size:
        ax.plot(eval_steps, logloss, "o-", label="test logloss")
    ax.set(xlabel="step", ylabel="sigmoid cross-entropy", title="Loss")
    ax.legend()
    ax.grid(alpha=0.3)
    return figure


def _auc_figure(history: Sequence[dict[str, Any]]) -> Figure | None:
    """Test AUC, and GAUC when computed, at each evaluation."""
    curves = {name: series(history, key, "eval") for key, name in (("auc", "AUC"), ("gauc", "GAUC"))}
    if not curves["AUC"][0].size:
        return None
    figure = _figure()
    ax = figure.add_subplot()
    for name, (steps, values) in curves.items():
        if steps.size:
            ax.plot(steps, values, "o-", label=f"test {name} (last {values[-1]:.4f})")
    ax.set(xlabel="step", ylabel="area under the ROC curve", title="Test AUC")
    ax.legend()
    ax.grid(alpha=0.3)
    return figure


def _throughput_figure(history: Sequence[dict[str, Any]]) -> Figure | None:
    """Train samples per second at the log points (the first, compiling step excluded by the loop)."""
    steps, rate = series(history, "samples_per_sec")
    if not steps.size:
        return None
    figure = _figure()
    ax = figure.add_subplot()
    ax.plot(steps, rate, "o-", markersize=3)
    ax.set(xlabel="step", ylabel="samples / s", title="Train throughput")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    return figure


def _attention_histogram(values: np.ndarray) -> Figure | None:
    """The distribution of attention weights over real history positions."""
    if not values.size:
        return None
    figure = _figure()
    ax = figure.add_subplot()
    ax.hist(values, bins=50)
    ax.set(xlabel="attention weight", ylabel="history positions",
           title=f"Attention weights over {values.size:,} real history positions")
    ax.grid(alpha=0.3)
    return figure


def _define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Run directory whose history.jsonl to plot; PNGs go to WORKDIR/plots.",
                        required=True)


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    workdir = flags.FLAGS.workdir
    history = read_history(workdir)
    if not history:
        print(f"error: {os.path.join(workdir, HISTORY_FILE)}: no training history; is --workdir the directory of a "
              "run (python -m din_jax.main --workdir ...)?", file=sys.stderr)
        sys.exit(1)
    for path in write_run_plots(workdir, history):
        print(path)


if __name__ == "__main__":
    _define_flags()
    app.run(main)
