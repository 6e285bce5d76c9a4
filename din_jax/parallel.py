"""Processes, devices and shardings of data-parallel training: jax.distributed, the `data` mesh, global batches.

A run is one process (nothing to initialise) or N processes that meet at a coordinator (process 0).
Who is who comes from din_jax.main's flags, else from the environment: din_jax's own variables (set
by launch/local.py and the Kubernetes manifests), the pod index of a Kubernetes Indexed Job or JobSet,
or SLURM's task variables. Every process then sees all devices of the run as one mesh with a single
`data` axis: each global batch is split along it (process p holds the p-th contiguous share), and
parameters and optimizer state are replicated. One process runs exactly the same code on a mesh of one.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Callable, Mapping, TypeVar

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA_AXIS = "data"

# The environment a process reads when main's flags leave a value unset (launch/ and its tests use these names).
ENV_COORDINATOR_ADDRESS = "DIN_COORDINATOR_ADDRESS"  # host:port of process 0's coordinator service
ENV_NUM_PROCESSES = "DIN_NUM_PROCESSES"
ENV_PROCESS_ID = "DIN_PROCESS_ID"
ENV_COORDINATOR_PORT = "DIN_COORDINATOR_PORT"        # SLURM: the coordinator's port on the first node
ENV_JOB_COMPLETION_INDEX = "JOB_COMPLETION_INDEX"    # set by Kubernetes in each pod of an Indexed Job / JobSet
ENV_SLURM_PROCID = "SLURM_PROCID"
ENV_SLURM_NTASKS = "SLURM_NTASKS"
ENV_SLURM_NODELIST = "SLURM_STEP_NODELIST"
ENV_SLURM_JOB_NODELIST = "SLURM_JOB_NODELIST"
DEFAULT_SLURM_PORT = 1234

T = TypeVar("T")


class ParallelError(ValueError):
    """The processes of a run are not fully described; the message names the flag or variable to set."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where the coordinator listens, how many processes the run has, and which one this is."""

    coordinator_address: str
    num_processes: int
    process_id: int


def resolve_cluster(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
                    env: Mapping[str, str] | None = None) -> Cluster | None:
    """The run's processes from explicit values, else the environment; None for a single-process run."""
    env = os.environ if env is None else env
    slurm = ENV_SLURM_PROCID in env and ENV_SLURM_NTASKS in env
    count = num_processes or _env_int(env, ENV_NUM_PROCESSES) or (_env_int(env, ENV_SLURM_NTASKS) if slurm else 0)
    if count <= 1:
        return None
    if process_id < 0:
        for name in (ENV_PROCESS_ID, ENV_JOB_COMPLETION_INDEX, ENV_SLURM_PROCID):
            if name in env:
                process_id = _env_int(env, name)
                break
        else:
            raise ParallelError(f"a run of {count} processes needs this process's id: pass --process_id or set "
                                f"{ENV_PROCESS_ID} (Kubernetes Indexed Jobs set {ENV_JOB_COMPLETION_INDEX})")
    if not 0 <= process_id < count:
        raise ParallelError(f"process id {process_id} is outside [0, {count}); give each of the {count} processes "
                            "a distinct --process_id from 0 to num_processes - 1")
    address = coordinator_address or env.get(ENV_COORDINATOR_ADDRESS, "")
    if not address and slurm:
        nodes = env.get(ENV_SLURM_NODELIST) or env.get(ENV_SLURM_JOB_NODELIST, "")
        if nodes:
            address = f"{first_host(nodes)}:{_env_int(env, ENV_COORDINATOR_PORT) or DEFAULT_SLURM_PORT}"
    if not address:
        raise ParallelError(f"a run of {count} processes needs the coordinator's host:port (process 0): pass "
                            f"--coordinator_address or set {ENV_COORDINATOR_ADDRESS}")
    return Cluster(address, count, process_id)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'node[003-005,9],gpu1' -> 'node003'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ParallelError(f"cannot read the SLURM node list {nodelist!r}; set {ENV_COORDINATOR_ADDRESS}=host:port")
    prefix, ranges = match.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "")


def _env_int(env: Mapping[str, str], name: str) -> int:
    value = env.get(name, "")
    if not value:
        return 0
    try:
        return int(value)
    except ValueError:
        raise ParallelError(f"environment variable {name}={value!r} must be an integer") from None


def initialize(cluster: Cluster | None, heartbeat_timeout_seconds: int = 30,
               initialization_timeout_seconds: int = 300) -> None:
    """Joins the run's processes (jax.distributed) before any computation; a single process needs nothing.

    A process that stops sending heartbeats for `heartbeat_timeout_seconds` is declared dead and the
    others are stopped, so a lost process never leaves the rest hanging.
    """
    if cluster is None:
        return
    jax.distributed.initialize(coordinator_address=cluster.coordinator_address,
                               num_processes=cluster.num_processes, process_id=cluster.process_id,
                               initialization_timeout=initialization_timeout_seconds,
                               heartbeat_timeout_seconds=heartbeat_timeout_seconds)


def limit_cpus(count: int) -> None:
    """The seed's --intra: run this process on its first `count` allowed CPU cores (0: all of them).

    XLA:CPU sizes its intra-op thread pool from the cores the process may use, so this must run before
    the first computation; afterwards it still confines the threads to those cores.
    """
    if count <= 0:
        return
    allowed = sorted(os.sched_getaffinity(0))
    if count > len(allowed):
        raise ParallelError(f"config.intra={count} asks for more cores than this process may use ({len(allowed)}); "
                            f"pass at most {len(allowed)}, or 0 for all")
    os.sched_setaffinity(0, allowed[:count])


def is_primary() -> bool:
    """Whether this is process 0, the one that writes shared files (metrics, TensorBoard, prepared data)."""
    return jax.process_index() == 0


def data_mesh() -> Mesh:
    """All devices of the run on one `data` axis, each process's devices contiguous and in process order."""
    devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
    return Mesh(np.array(devices), (DATA_AXIS,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension split over the `data` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device (parameters, optimizer state, step outputs)."""
    return NamedSharding(mesh, PartitionSpec())


def local_shards(mesh: Mesh) -> int:
    """How many of the mesh's batch shards this process holds (its devices on the `data` axis)."""
    return sum(d.process_index == jax.process_index() for d in mesh.devices.flat)


def device_shares(batch: Mapping[str, np.ndarray], devices: int) -> list[dict[str, np.ndarray]]:
    """This process's share of a batch cut into its `devices` devices' shards, as global_batch splits it: every
    column in equal consecutive parts along its first axis (views)."""
    return [{name: v[k * len(v) // devices:(k + 1) * len(v) // devices] for name, v in batch.items()}
            for k in range(devices)]


def local_rows(array: jax.Array) -> list[np.ndarray]:
    """This process's shards of an array split over `data` along its first axis, as numpy, in device order."""
    return [np.asarray(s.data) for s in sorted(array.addressable_shards, key=lambda s: s.index[0].start or 0)]


def global_batch(local: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
    """This process's rows of every column -> global arrays of all processes' rows, split over `data`.

    Columns that already are such global arrays pass through unchanged.
    """
    sharding, scale = batch_sharding(mesh), mesh.size // local_shards(mesh)
    ready = {name: v for name, v in local.items() if isinstance(v, jax.Array) and v.sharding == sharding}
    if jax.process_count() == 1:  # one transfer of every column: half the host time of one call per column
        return {**jax.device_put({k: v for k, v in local.items() if k not in ready}, sharding), **ready}

    def to_global(value):
        return jax.make_array_from_process_local_data(sharding, value, (value.shape[0] * scale, *value.shape[1:]))

    return {name: ready[name] if name in ready else to_global(value) for name, value in local.items()}


def gather(tree: Any) -> Any:
    """Global arrays (any sharding) -> their full values as numpy, on every process."""
    return multihost_utils.process_allgather(tree, tiled=True)


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier `name`."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def gather_host(value: np.ndarray) -> np.ndarray:
    """This process's numpy array (same shape in every process) -> [processes, ...] of all of them, on every process."""
    if jax.process_count() == 1:
        return np.asarray(value)[None]
    return np.asarray(multihost_utils.process_allgather(np.asarray(value), tiled=False))


class _CoordinatorCounter:
    """A workqueue.Counter kept in the coordinator's key-value store: atomic across the run's processes."""

    def __init__(self, client: Any):
        self._client = client

    def increment(self, key: str) -> int:
        return self._client.key_value_increment(f"din_jax/counter/{key}", 1) - 1


def shared_counter() -> Any:
    """A counter every process of the run shares (input_pipeline.workqueue.Counter)."""
    from input_pipeline.workqueue import LocalCounter
    if jax.process_count() == 1:
        return LocalCounter()
    from jax._src import distributed  # the client jax.distributed.initialize connected; no public accessor
    return _CoordinatorCounter(distributed.global_state.client)


def primary_first(name: str, fn: Callable[[], T]) -> T:
    """fn() on process 0, then on the others: shared files (prepared data, caches) are written once."""
    if jax.process_count() == 1:
        return fn()
    result = fn() if is_primary() else None
    barrier(name)
    return result if is_primary() else fn()
