"""Launchers: local processes that stop together, and Kubernetes manifests that match what parallel.py reads."""

from __future__ import annotations

import importlib.metadata
import io
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import pytest
import yaml

from din_jax import parallel, progress
from launch import local

ROOT = pathlib.Path(__file__).resolve().parents[1]
MANIFESTS = sorted((ROOT / "launch" / "k8s").glob("*.yaml"))


def child(script: str) -> list[str]:
    prologue = f"import os, sys, time\nindex = int(os.environ['{parallel.ENV_PROCESS_ID}'])\n"
    return [sys.executable, "-c", prologue + script]


def test_launcher_prefixes_each_process_lines_and_succeeds_when_all_do():
    out = io.StringIO()
    code = local.launch(3, child(f"print('hello from', index, os.environ['{parallel.ENV_NUM_PROCESSES}'], "
                                 f"os.environ['{parallel.ENV_COORDINATOR_ADDRESS}'].startswith('localhost:'))"), out)
    assert code == 0
    assert sorted(out.getvalue().splitlines()) == [f"[{i}] hello from {i} 3 True" for i in range(3)]


def test_one_failing_process_stops_the_others_and_its_code_is_the_launchers():
    out = io.StringIO()
    start = time.monotonic()
    code = local.launch(2, child("print('up', flush=True)\nif index == 1: sys.exit(3)\ntime.sleep(120)"), out,
                        grace_seconds=2)
    assert code == 3 and time.monotonic() - start < 30
    assert "[launch] process 1 exited with code 3; stopping the others" in out.getvalue()


def test_launcher_gives_one_cpu_device_per_process():
    env = local.process_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=4 --xla_foo=1"}, 1, 2, "h:1")
    assert env["XLA_FLAGS"] == "--xla_foo=1" and env["JAX_PLATFORMS"] == "cpu"
    assert parallel.resolve_cluster(env=env) == parallel.Cluster("h:1", 2, 1)


def test_a_killed_process_stops_the_others_within_60_seconds(tmp_path):
    """Without a launcher to stop them (as on Kubernetes), the survivors notice the loss themselves."""
    address = f"localhost:{local.free_port()}"
    tiny = ["--config.synthetic.num_users=400", "--config.synthetic.num_items=300",
            "--config.synthetic.num_categories=20", "--config.synthetic.mean_reviews=6",
            "--config.synthetic.max_reviews=20", "--config.batch_size=64", "--config.steps=1000000",
            "--config.progress_bar=False", "--config.log_every_steps=1"]
    processes, outputs = [], [[], []]
    for index in range(2):
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "din_jax.main", "--config", "configs/default.py", "--workdir", str(tmp_path), *tiny],
            cwd=ROOT, env=local.process_env(os.environ, index, 2, address), stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
        threading.Thread(target=lambda p, lines: lines.extend(p.stdout), args=(processes[-1], outputs[index]),
                         daemon=True).start()
    try:
        deadline = time.monotonic() + 120
        while not any("Data " in line for line in outputs[1]) and time.monotonic() < deadline:
            assert all(p.poll() is None for p in processes), "".join(outputs[0] + outputs[1])[-3000:]
            time.sleep(0.2)
        time.sleep(3)  # into the training steps
        processes[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        code = processes[0].wait(timeout=90)
        assert time.monotonic() - killed < 60
        assert code != 0
        text = "".join(outputs[0])
        assert "error: process 0 of 2 stopped" in text or "another task died" in text, text[-3000:]
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()


def test_din_launch_is_the_installed_console_script_of_the_launcher():
    (script,) = importlib.metadata.entry_points(group="console_scripts", name="din-launch")
    assert script.load() is local.main


def test_progress_bar_in_a_pipe_writes_plain_lines_not_a_redraw_per_update():
    out = io.StringIO()  # not a terminal, as the pipe launch.local reads
    bar = progress.progress_bar(1000, file=out)
    for step in range(1000):
        bar.update(1)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{step / 1000:.4f}")
    bar.close()
    first, last = out.getvalue().splitlines()  # at the start, and when the bar closes: updates came faster than 30 s
    assert "\r" not in out.getvalue()
    assert first.startswith("train:   0%|") and "| 0/1000 " in first
    assert last.startswith("train: 100%|") and "| 1000/1000 " in last and last.endswith("loss=0.9900]")


def test_periodic_lines_write_the_latest_redraw_once_the_interval_has_passed_and_at_the_end():
    now, out = [0.0], io.StringIO()
    lines = progress.PeriodicLines(out, 30, clock=lambda: now[0])
    for t, text in [(0, "\rstep 1   "), (10, "\rstep 2"), (31, "\rstep 3"), (40, "\rstep 4"), (45, "\rstep 5\n")]:
        now[0] = t
        lines.write(text)
    assert out.getvalue() == "step 1\nstep 3\nstep 5\n"


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_kubernetes_manifest_runs_one_pod_per_process_with_the_env_parallel_reads(path):
    documents = {d["kind"]: d for d in yaml.safe_load_all(path.read_text())}
    job, service = documents["Job"], documents["Service"]
    spec = job["spec"]
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    processes = int(env[parallel.ENV_NUM_PROCESSES]["value"])
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == processes > 1
    assert env[parallel.ENV_JOB_COMPLETION_INDEX]["valueFrom"]["fieldRef"]["fieldPath"] == (
        "metadata.annotations['batch.kubernetes.io/job-completion-index']")
    # The coordinator is pod 0, reached through the headless service the pods' subdomain names.
    name = job["metadata"]["name"]
    host, port = env[parallel.ENV_COORDINATOR_ADDRESS]["value"].split(":")
    assert host == f"{name}-0.{service['metadata']['name']}" and service["spec"]["clusterIP"] == "None"
    assert spec["template"]["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"] == {"job-name": name} and service["spec"]["ports"][0]["port"] == int(port)
    # Every pod mounts the shared (ReadWriteMany) volume that holds the data and the run directory.
    claim = documents["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    volume = spec["template"]["spec"]["volumes"][0]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    mount = container["volumeMounts"][0]["mountPath"]
    flags = container["command"]
    assert flags[:3] == ["python", "-m", "din_jax.main"]
    assert any(f.startswith(f"--workdir={mount}/") for f in flags)
    assert any(f.startswith(f"--config.data_dir={mount}/") for f in flags)
    # The config file is named with the process count (global batch = 512 per process), and every
    # --config.key override exists.
    from configs import multihost
    config_flags = [f for f in flags if f.startswith("--config=")]
    assert config_flags == [f"--config=configs/multihost.py:{processes}"]
    config = multihost.get_config(str(processes))
    assert config.batch_size == 512 * processes
    overrides = dict(f[len("--config."):].split("=", 1) for f in flags if f.startswith("--config."))
    for key in overrides:
        assert key in config, key
    assert overrides.get("precision", "fp32") == ("mixed_bf16" if "bf16" in path.name else "fp32")
