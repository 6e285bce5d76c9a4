"""Multi-process training over rate-limited links: one network namespace per process, veth to a bridge, tc tbf.

    sudo python benchmarks/shaped_links.py [--processes 2,4] [--rates none,1gbit,10gbit] [--per_process 256]

Loopback is far faster than a data-centre link, so benchmarks/multiprocess.py counts bytes and models the
time they take. Here each process of a run gets its own network namespace (`ip netns`) whose only link is a
veth pair to a bridge in this one, shaped to --rates in both directions with `tc qdisc ... tbf` (a host's
full-duplex NIC: every process has its own link, as separate hosts would), and the processes find each other
over the bridge (coordinator on 10.77.0.2; each namespace's /etc/hosts names the host by its own address, so
that gloo listens there). Each run trains `--steps` steps of the built-in data without
evaluation, replicated tables against `--config.shard_embeddings=true`, and reports train samples/s (the
first, compiling step excluded).

Not modelled: latency. tc's netem (delay) is not in this machine's kernel, so a hop costs what the bridge
costs (~30 us), not 0.1-0.5 ms. Needs root (namespaces, links and qdiscs are created and removed here).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)  # run as a script from anywhere

from launch import local  # noqa: E402

BRIDGE, PREFIX, SUBNET = "dinbr", "dinP", "10.77.0"
ETC_NETNS = "/etc/netns"
MODES = {"replicated": [], "sharded": ["--config.shard_embeddings=true"]}


def _ip(*args: str, namespace: str | None = None) -> None:
    command = (["ip", "netns", "exec", namespace] if namespace else []) + list(args)
    subprocess.run(command, check=True, capture_output=True, text=True)


def links_up(processes: int, rate: str) -> None:
    """A namespace per process, 10.77.0.(i + 2), its veth to the bridge shaped to `rate` both ways ('none': not
    shaped, the bridge's own speed)."""
    links_down()
    _ip("ip", "link", "add", BRIDGE, "type", "bridge")
    _ip("ip", "addr", "add", f"{SUBNET}.1/24", "dev", BRIDGE)
    _ip("ip", "link", "set", BRIDGE, "up")
    shape = ["root", "tbf", "rate", rate, "burst", "256kb", "latency", "50ms"]
    for i in range(processes):
        ns, host, inner = f"{PREFIX}{i}", f"dh{i}", f"dn{i}"
        _ip("ip", "netns", "add", ns)
        _ip("ip", "link", "add", host, "type", "veth", "peer", "name", inner)
        _ip("ip", "link", "set", inner, "netns", ns)
        _ip("ip", "link", "set", host, "master", BRIDGE)
        _ip("ip", "link", "set", host, "up")
        _ip("ip", "addr", "add", f"{SUBNET}.{i + 2}/24", "dev", inner, namespace=ns)
        _ip("ip", "link", "set", inner, "up", namespace=ns)
        _ip("ip", "link", "set", "lo", "up", namespace=ns)
        if rate != "none":
            _ip("tc", "qdisc", "add", "dev", host, *shape)
            _ip("tc", "qdisc", "add", "dev", inner, *shape, namespace=ns)
        # gloo listens on the address this host's name resolves to; `ip netns exec` mounts /etc/netns/NS/hosts.
        os.makedirs(os.path.join(ETC_NETNS, ns), exist_ok=True)
        with open(os.path.join(ETC_NETNS, ns, "hosts"), "w") as f:
            f.write(f"127.0.0.1 localhost\n{SUBNET}.{i + 2} {socket.gethostname()}\n")


def links_down() -> None:
    """Removes what links_up made (host-side veth ends first: a deleted namespace frees its own ends lazily)."""
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    for name in re.findall(r"^\d+: (dh\d+)@", links, flags=re.M):
        subprocess.run(["ip", "link", "del", name], capture_output=True)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split()
    for name in listed:
        if name.startswith(PREFIX):
            subprocess.run(["ip", "netns", "del", name], capture_output=True)
            shutil.rmtree(os.path.join(ETC_NETNS, name), ignore_errors=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


def train_run(args, processes: int, mode: str, workdir: str) -> float:
    """samples/s of one run, process i in namespace i."""
    shutil.rmtree(workdir, ignore_errors=True)
    os.makedirs(workdir)
    flags = ["--config", os.path.join(_REPO, "configs", "default.py"), "--workdir", workdir,
             f"--config.data_dir={args.data_dir}", f"--config.batch_size={processes * args.per_process}",
             f"--config.steps={args.steps}", "--config.no_eval=true", "--config.progress_bar=false",
             "--config.save_steps=0", "--config.log_every_steps=1000", *MODES[mode]]
    address = f"{SUBNET}.2:{local.free_port()}"
    children = []
    with open(os.path.join(workdir, "log.txt"), "w") as log:
        for i in range(processes):
            command = ["ip", "netns", "exec", f"{PREFIX}{i}", sys.executable, "-m", "din_jax.main", *flags]
            children.append(subprocess.Popen(command, cwd=_REPO, stdout=log, stderr=subprocess.STDOUT,
                                             env=local.process_env(os.environ, i, processes, address)))
        codes = [c.wait() for c in children]
    if any(codes):
        raise RuntimeError(f"{processes} processes, {mode}: exit codes {codes}; see {workdir}/log.txt")
    with open(os.path.join(workdir, "train_summary.json")) as f:
        return json.load(f)["samples_per_sec"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="/tmp/din_shaped_links")
    parser.add_argument("--data_dir", default="", help="built-in data (default WORKDIR/data; made on first use)")
    parser.add_argument("--processes", default="2,4")
    parser.add_argument("--rates", default="none,1gbit,10gbit", help="tc rates; 'none': links not shaped")
    parser.add_argument("--per_process", type=int, default=256, help="examples per process per step")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("error: creating network namespaces and qdiscs needs root; run with sudo")
    args.data_dir = args.data_dir or os.path.join(args.workdir, "data")
    if not os.path.isdir(args.data_dir):  # the built-in data, made once by a short plain run
        subprocess.run([sys.executable, "-m", "din_jax.main", "--config", os.path.join(_REPO, "configs", "default.py"),
                        "--workdir", os.path.join(args.workdir, "prepare"), f"--config.data_dir={args.data_dir}",
                        "--config.steps=1", "--config.no_eval=true", "--config.progress_bar=false"],
                       cwd=_REPO, check=True, capture_output=True)
    print("| processes | link | replicated samples/s | sharded samples/s | sharded / replicated |")
    print("|---|---|---|---|---|")
    try:
        for rate in args.rates.split(","):
            for n in (int(p) for p in args.processes.split(",")):
                links_up(n, rate)
                start = time.perf_counter()
                rates = {mode: train_run(args, n, mode, os.path.join(args.workdir, f"{n}_{rate}_{mode}"))
                         for mode in MODES}
                print(f"| {n} | {rate} | {rates['replicated']:,.0f} | {rates['sharded']:,.0f} | "
                      f"{rates['sharded'] / rates['replicated']:.2f}x |  ({time.perf_counter() - start:.0f} s)",
                      flush=True)
    finally:
        links_down()


if __name__ == "__main__":
    main()
