"""N din_jax processes on this machine: python -m launch.local --num_processes N -- <din_jax.main flags>.

Each process runs `python -m din_jax.main <flags>` with one CPU device and finds the others through a
coordinator on a free local port (the environment din_jax.parallel reads). Output lines are prefixed
with the process index; when a process fails, the others are stopped and the launcher exits with the
failing process's code, so a lost process never leaves the run hanging.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Mapping, Sequence, TextIO

from din_jax import parallel

POLL_SECONDS = 0.2


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def process_env(base: Mapping[str, str], process_id: int, num_processes: int, address: str) -> dict[str, str]:
    """`base` plus what din_jax.parallel reads to place process `process_id`, on one CPU device."""
    env = dict(base)
    env.update({parallel.ENV_COORDINATOR_ADDRESS: address, parallel.ENV_NUM_PROCESSES: str(num_processes),
                parallel.ENV_PROCESS_ID: str(process_id), "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"})
    # One CPU device per process: two processes with two virtual CPU devices each deadlocked here (jax 0.10.2)
    # when 100+ steps were dispatched without blocking. Drop any forced host device count.
    xla_flags = env.get("XLA_FLAGS", "").split()
    env["XLA_FLAGS"] = " ".join(f for f in xla_flags if not f.startswith("--xla_force_host_platform_device_count"))
    return env


def _relay(index: int, stream: TextIO, out: TextIO, lock: threading.Lock) -> None:
    """Copies a process's output to `out`, each line prefixed with [index]."""
    for line in stream:
        with lock:
            out.write(f"[{index}] {line}")
            out.flush()


def _stop_all(processes: list[subprocess.Popen], grace_seconds: float) -> None:
    """SIGTERM to every running process, SIGKILL to those still running after `grace_seconds`."""
    for p in processes:
        if p.poll() is None:
            p.terminate()
    deadline = time.monotonic() + grace_seconds
    for p in processes:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def launch(num_processes: int, command: Sequence[str], out: TextIO = sys.stdout, grace_seconds: float = 10.0,
           cwd: str | None = None) -> int:
    """Runs `command` as N coordinated processes; returns 0 when all succeed, else the first failure's code."""
    if num_processes < 1:
        raise ValueError(f"--num_processes must be at least 1, got {num_processes}")
    address = f"localhost:{free_port()}"
    lock = threading.Lock()
    processes, relays = [], []
    for index in range(num_processes):
        p = subprocess.Popen(list(command), env=process_env(os.environ, index, num_processes, address), cwd=cwd,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, errors="replace")
        processes.append(p)
        relays.append(threading.Thread(target=_relay, args=(index, p.stdout, out, lock), daemon=True))
        relays[-1].start()
    code = None
    try:
        while code is None:
            codes = [p.poll() for p in processes]
            failed = next(((i, c) for i, c in enumerate(codes) if c not in (None, 0)), None)
            if failed:
                index, code = failed
                with lock:
                    out.write(f"[launch] process {index} exited with code {code}; stopping the others\n")
            elif all(c == 0 for c in codes):
                code = 0
            else:
                time.sleep(POLL_SECONDS)
    except KeyboardInterrupt:
        code = 130
    finally:
        _stop_all(processes, grace_seconds)
        for relay in relays:
            relay.join(timeout=5)
    return 128 - code if code < 0 else code  # killed by signal S: Popen says -S, shells say 128 + S


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM to the launcher stops every process, as Ctrl-C does


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     usage="python -m launch.local --num_processes N -- <din_jax.main flags>")
    parser.add_argument("--num_processes", type=int, required=True, help="processes to start, one CPU device each")
    parser.add_argument("--module", default="din_jax.main", help="the Python module each process runs")
    parser.add_argument("flags", nargs=argparse.REMAINDER, help="flags for the module, after --")
    args = parser.parse_args(argv)
    flags = args.flags[1:] if args.flags[:1] == ["--"] else args.flags
    if args.num_processes < 1:
        parser.error(f"--num_processes must be at least 1, got {args.num_processes}")
    signal.signal(signal.SIGTERM, _interrupt)
    return launch(args.num_processes, [sys.executable, "-m", args.module, *flags])


if __name__ == "__main__":
    sys.exit(main())
