"""Specifications of the run plots: which PNGs a history gives, that they are real images, what is binned."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from matplotlib import image as mpimg

from din_jax import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_record(step: int, loss: float = 0.6, rate: float = 50_000.0) -> dict:
    return {"step": step, "loss": loss, "samples_per_sec": rate}


def eval_record(step: int, auc: float = 0.7, gauc: float = 0.68) -> dict:
    return {"step": step, "eval": {"auc": auc, "gauc": gauc, "accuracy": 0.65, "logloss": 0.58}}


def write_history(workdir, records, tail: str = "") -> None:
    with open(os.path.join(workdir, "history.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
        f.write(tail)


def names(paths) -> list[str]:
    return [os.path.basename(p) for p in paths]


def assert_png(path: str) -> None:
    with open(path, "rb") as f:
        assert f.read(8) == PNG_SIGNATURE
    height, width, channels = mpimg.imread(path).shape
    assert (width, height) == (640, 400) and channels in (3, 4)


def test_run_writes_loss_auc_throughput_and_attention_pngs(tmp_path):
    history = [train_record(s, loss=0.7 - s / 1000) for s in range(10, 101, 10)] + [eval_record(50), eval_record(100)]
    rng = np.random.default_rng(0)
    weights = rng.random((64, 8))
    mask = np.arange(8) < rng.integers(1, 9, 64)[:, None]
    paths = plots.write_run_plots(str(tmp_path), history, weights, mask)
    assert names(paths) == ["loss.png", "auc.png", "throughput.png", "attention.png"]
    assert all(os.path.dirname(p) == str(tmp_path / "plots") for p in paths)
    for path in paths:
        assert_png(path)
    assert sorted(os.listdir(tmp_path / "plots")) == sorted(names(paths))  # no temporary files left behind


def test_attention_histogram_bins_only_real_history_positions(tmp_path, monkeypatch):
    weights = np.array([[0.25, 0.75, 0.0], [1.0, 0.0, 0.0]], np.float32)
    mask = np.array([[True, True, False], [True, False, False]])
    np.testing.assert_array_equal(plots.real_attention_weights(weights, mask), [0.25, 0.75, 1.0])
    binned = []
    histogram = plots._attention_histogram
    monkeypatch.setattr(plots, "_attention_histogram", lambda values: binned.append(values) or histogram(values))
    plots.write_run_plots(str(tmp_path), [], weights, mask)
    np.testing.assert_array_equal(binned[0], [0.25, 0.75, 1.0])


def test_attention_weights_and_mask_must_have_one_shape():
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(2, 4\)"):
        plots.real_attention_weights(np.zeros((2, 3)), np.ones((2, 4), bool))


def test_attention_weights_without_history_mask_is_refused(tmp_path):
    with pytest.raises(ValueError, match="together"):
        plots.write_run_plots(str(tmp_path), [], np.zeros((2, 3)))


def test_run_without_evaluation_has_no_auc_plot(tmp_path):
    paths = plots.write_run_plots(str(tmp_path), [train_record(5), train_record(10)])
    assert names(paths) == ["loss.png", "throughput.png"]


def test_empty_history_and_no_attention_write_nothing(tmp_path):
    assert plots.write_run_plots(str(tmp_path), []) == []
    assert not os.path.exists(tmp_path / "plots")


def test_missing_history_file_reads_as_empty(tmp_path):
    assert plots.read_history(str(tmp_path)) == []


def test_truncated_last_line_of_a_crashed_run_is_skipped(tmp_path):
    write_history(tmp_path, [train_record(5), eval_record(5)], tail='{"step": 10, "loss": 0.5')
    assert plots.read_history(str(tmp_path)) == [train_record(5), eval_record(5)]


def test_resumed_run_keeps_the_last_record_of_each_step(tmp_path):
    # Crashed at step 15 with a checkpoint at 10: the resumed run logs 15 again, after the cut line.
    write_history(tmp_path, [train_record(5, loss=0.7), train_record(10, loss=0.6)], tail='{"step": 15, "lo')
    plots.append_history(str(tmp_path), train_record(15, loss=0.4))
    steps, loss = plots.series(plots.read_history(str(tmp_path)), "loss")
    np.testing.assert_array_equal(steps, [5, 10, 15])
    np.testing.assert_array_equal(loss, [0.7, 0.6, 0.4])


def test_append_history_writes_one_json_line_per_record(tmp_path):
    plots.append_history(str(tmp_path), {"step": np.int64(5), "loss": np.float32(0.5), "samples_per_sec": 10.0})
    plots.append_history(str(tmp_path), eval_record(5))
    assert (tmp_path / "history.jsonl").read_text().splitlines() == [
        '{"step": 5, "loss": 0.5, "samples_per_sec": 10.0}', json.dumps(eval_record(5))]


def test_series_reads_eval_metrics_and_skips_missing_or_nan_values():
    history = [train_record(5), eval_record(5, gauc=float("nan")), {"step": 10, "eval": {"auc": 0.75}}]
    np.testing.assert_array_equal(plots.series(history, "auc", "eval")[1], [0.7, 0.75])
    assert plots.series(history, "gauc", "eval")[0].size == 0


def test_attention_heatmap_leaves_padding_blank_and_cuts_unused_positions():
    weights = np.array([[0.5, 0.5, 0.0, 0.0], [0.2, 0.3, 0.5, 0.0]], np.float32)
    mask = weights > 0
    figure = plots.attention_heatmap(weights, mask, items=[["a", "b", "", ""], ["c", "d", "e", ""]],
                                     row_labels=["u1", "u2"])
    ax = figure.axes[0]
    shown = ax.images[0].get_array()
    np.testing.assert_array_equal(shown.mask, [[False, False, True], [False, False, False]])
    assert [t.get_text() for t in ax.texts] == ["a", "b", "c", "d", "e"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["u1", "u2"]


def test_cli_redraws_plots_from_history(tmp_path):
    write_history(tmp_path, [train_record(5), train_record(10), eval_record(10)])
    done = subprocess.run([sys.executable, "-m", "din_jax.plots", "--workdir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == [str(tmp_path / "plots" / n) for n in ("loss.png", "auc.png", "throughput.png")]


def test_cli_without_history_says_what_is_missing(tmp_path):
    done = subprocess.run([sys.executable, "-m", "din_jax.plots", "--workdir", str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True)
    assert done.returncode == 1
    assert done.stderr.startswith(f"error: {tmp_path / 'history.jsonl'}: no training history")
