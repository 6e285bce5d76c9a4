"""The results table printed at the end of a run."""

from __future__ import annotations

from typing import Any


def results_table(results: dict[str, Any], workdir: str) -> str:
    """A two-column table of eval metrics and throughput, and where the files are."""
    train, evaluation = results["train"], results["eval"]
    rows = [("step", f"{train['steps']}")]
    for name in ("auc", "auc_1000", "gauc", "accuracy", "logloss"):
        if name in evaluation:
            rows.append((f"test {name}", f"{evaluation[name]:.5f}"))
    if "num_examples" in evaluation:
        rows.append(("test examples", f"{evaluation['num_examples']:,}"))
    if train.get("evaluated_only"):  # a rerun of a finished run: nothing trained, nothing compiled for training
        rows.append(("this run", "evaluated only"))
    else:
        if train.get("samples_per_sec"):
            rows.append(("train samples/s", f"{train['samples_per_sec']:,.0f}"))
        rows.append(("compile seconds", f"{train['compile_seconds']:.1f}"))
    rows.append(("wall seconds", f"{train['wall_seconds']:.1f}"))
    width = max(len(name) for name, _ in rows)
    value_width = max(12, *(len(value) for _, value in rows))
    lines = ["", "din_jax results", "-" * (width + value_width + 2)]
    lines += [f"{name:<{width}}  {value:>{value_width}}" for name, value in rows]
    lines += ["-" * (width + value_width + 2), f"metrics: {workdir}/eval_metrics.json, {workdir}/train_summary.json",
              f"tensorboard --logdir {workdir}/tensorboard"]
    return "\n".join(lines)
