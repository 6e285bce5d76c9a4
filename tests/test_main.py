"""The command line: one-sentence errors for bad input, and a tiny real run through main."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config.synthetic.num_users=400", "--config.synthetic.num_items=300", "--config.synthetic.num_categories=20",
        "--config.synthetic.mean_reviews=6", "--config.synthetic.max_reviews=20", "--config.batch_size=64"]


def run_main(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "din_jax.main", "--config", "configs/default.py", *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def assert_one_line_error(result: subprocess.CompletedProcess, code: int, *fragments: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


def test_unknown_config_key_is_named(tmp_path):
    assert_one_line_error(run_main("--workdir", str(tmp_path), "--config.bogus_field=3"), 2, "'config.bogus_field'")
    assert_one_line_error(run_main("--workdir", str(tmp_path), "--config.model.bogus=3"), 2, "'config.model.bogus'")


@pytest.mark.parametrize("override, message", [
    ("--config.stepz=10", "error: unknown config key 'config.stepz' (did you mean 'config.steps'?)"),
    ("--config.model.embeding_dim=8",
     "error: unknown config key 'config.model.embeding_dim' (did you mean 'config.model.embedding_dim'?)"),
])
def test_near_miss_config_key_gets_one_clean_hint(tmp_path, override, message):
    result = run_main("--workdir", str(tmp_path), override)
    assert_one_line_error(result, 2)
    assert result.stderr.strip() == message


def test_bad_config_value_and_missing_config_file(tmp_path):
    assert_one_line_error(run_main("--workdir", str(tmp_path), "--config.batch_size=abc"), 2, "--config.batch_size=abc")
    assert_one_line_error(run_main("--workdir", str(tmp_path), "--config.optimizer=sgd"), 1, "config.optimizer='sgd'")
    result = subprocess.run([sys.executable, "-m", "din_jax.main", "--config", "configs/nope.py", "--workdir",
                             str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert_one_line_error(result, 2, "configs/nope.py")
    with_override = subprocess.run([sys.executable, "-m", "din_jax.main", "--config", "configs/nope.py", "--workdir",
                                    str(tmp_path), "--config.steps=3"], cwd=ROOT, capture_output=True, text=True,
                                   timeout=120)
    assert_one_line_error(with_override, 2, "configs/nope.py")
    assert len(with_override.stderr.strip().splitlines()) == 1


def test_a_full_embedding_variable_is_one_line_naming_the_config_field(tmp_path):
    result = run_main("--workdir", str(tmp_path), "--config.ev=true", "--config.ev_capacity=50", "--config.steps=2",
                      "--config.synthetic.num_users=400", "--config.synthetic.num_items=300",
                      "--config.synthetic.num_categories=20", "--config.batch_size=64")
    assert_one_line_error(result, 1, "embedding 'uid' is full: all 50 rows", "Raise config.ev_capacity (0: a row")


def test_missing_data_directory_says_how_to_prepare(tmp_path):
    result = run_main("--workdir", str(tmp_path), "--config.dataset=dien", f"--config.data_dir={tmp_path}/nope")
    assert_one_line_error(result, 1, f"{tmp_path}/nope", "python -m input_pipeline.amazon")


def test_malformed_sample_line_names_file_and_line(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for name, tokens in (("uid_voc.txt", "u1\n"), ("mid_voc.txt", "default_mid\nm1\n"), ("cat_voc.txt", "default_cat\nc\n")):
        (data / name).write_text(tokens)
    (data / "local_train_splitByUser").write_text("0\tu1\tm1\tc\tm1\tc\n1\tu1\tm1\tc\n")
    (data / "local_test_splitByUser").write_text("0\tu1\tm1\tc\tm1\tc\n")
    result = run_main("--workdir", str(tmp_path / "run"), "--config.dataset=dien", f"--config.data_dir={data}")
    assert_one_line_error(result, 1, "local_train_splitByUser:2:")


@pytest.mark.parametrize("extra", [["--config.timeline=2", "--config.steps=4"]])
def test_tiny_run_prints_results_and_writes_profile(tmp_path, extra):
    workdir = tmp_path / "run"
    result = run_main("--workdir", str(workdir), *TINY, *extra)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "din_jax results" in result.stdout and "test auc" in result.stdout
    assert json.loads((workdir / "eval_metrics.json").read_text())["step"] == 4
    traces = [f for _, _, files in os.walk(workdir / "profile") for f in files if f.endswith(".xplane.pb")]
    assert traces, "the --config.timeline trace was not written"
    assert "checkpoint_manager.py" not in result.stderr  # orbax chatter is filtered


def test_only_orbax_leftovers_of_a_reported_failure_are_kept_out_of_stderr(monkeypatch):
    import types
    from din_jax import main as main_module
    shown = []
    monkeypatch.setattr(main_module.sys, "__unraisablehook__", shown.append)
    namespace: dict = {}
    exec(compile("async def read():\n    pass\n", "/site-packages/orbax/checkpoint/serialization.py", "exec"), namespace)
    orbax_read = namespace["read"]()
    main_module._unraisable(types.SimpleNamespace(exc_value=Exception("reading array index"), object=orbax_read))
    main_module._unraisable(types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"), object=None))
    other = types.SimpleNamespace(exc_value=ValueError("ours"), object=None)
    main_module._unraisable(other)
    orbax_read.close()
    assert shown == [other]


def test_asyncio_reports_of_abandoned_orbax_reads_are_filtered_and_others_kept():
    import logging
    from din_jax import main as main_module
    quiet = main_module._QuietLibraries()

    def asyncio_record(message):
        return logging.LogRecord("asyncio", logging.ERROR, "/lib/asyncio/base_events.py", 1, message, None, None)
    abandoned = asyncio_record("Task exception was never retrieved\nfuture: <Task finished coro=<async_deserialize() "
                               "done, defined at /site-packages/orbax/checkpoint/_src/serialization/serialization.py:394>")
    assert not quiet.filter(abandoned)
    assert quiet.filter(asyncio_record("Task exception was never retrieved\nfuture: <Task coro=<ours() done>"))
    # A gathered future names no coroutine: its exception's traceback says where it was raised.
    namespace: dict = {}
    exec(compile("def read():\n    raise ValueError('Requested shape: (363, 8) is not compatible')\n",
                 "/site-packages/orbax/checkpoint/_src/serialization/serialization.py", "exec"), namespace)
    for reader, dropped in ((namespace["read"], True), (lambda: int("ours"), False)):
        try:
            reader()
        except ValueError:
            record = asyncio_record("_GatheringFuture exception was never retrieved\nfuture: <_GatheringFuture finished>")
            record.exc_info = sys.exc_info()
        assert quiet.filter(record) is not dropped
