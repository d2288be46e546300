"""Multi-host runs on JAX's own multi-controller runtime: one process per host, one global mesh.

Design decisions:
- `initialize` starts `jax.distributed` from explicit settings (`--coordinator HOST:PORT
  --num-processes N --process-id I`, or the same as MLLMJAX_COORDINATOR / MLLMJAX_NUM_PROCESSES /
  MLLMJAX_PROCESS_ID), or lets JAX detect the cluster: by itself in a SLURM job step of more than one
  task, and on request (MLLMJAX_DISTRIBUTED=1) anywhere JAX's detection works (TPU pod slices,
  Kubernetes, Open MPI). With none of these it does nothing: one process owns every device.
  On CPU it selects the gloo collectives, so several local processes can run one program (how the
  tests exercise this path).
- Rollouts are sharded by host: each process takes its own contiguous share of the prompts
  (`process_share`), decodes them on its own devices with a copy of the parameters resharded onto a
  per-host mesh (`host_local_copy`, one in-memory all-gather across hosts), and scores their rewards;
  the finished records are then gathered (`allgather_objects`, process order = prompt order), so the
  advantages, the global statistics and everything after them are computed from the whole batch and
  agree bit for bit with a one-process run. Decoding needs no cross-host traffic per token, and the
  hosts never wait on each other's slowest row.
- Training runs as one program over the global mesh (`jax.devices()`), and the host data that feeds
  it is the same on every process (the gathered records), so `jax.device_put` of host arrays onto
  global shardings needs no per-host bookkeeping; JAX checks that the values agree.
- Files: each process writes its own shards of a checkpoint (Orbax), process 0 alone writes the
  metadata, tokenizer and renames the finished directory into place; `barrier` keeps the others
  from running ahead of it. Console output comes from process 0 only.
"""

from __future__ import annotations

import os
import pickle
import uuid
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from mllmjax.errors import BadInputError

_started = False


def _cluster_detected() -> bool:
    """An `srun` step of more than one task, or MLLMJAX_DISTRIBUTED=1 (any launcher JAX's cluster
    detection knows: a multi-host TPU slice, Kubernetes, Open MPI).

    The step's own task count decides, not the job's: a batch script that runs one `mllmjax` in a
    job of several tasks is a single process and must not wait for peers that never start."""
    if os.environ.get("MLLMJAX_DISTRIBUTED", "") not in ("", "0"):
        return True
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NTASKS")
    try:
        step_tasks = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
    except ValueError:
        return False
    return step_tasks > 1 and all(k in os.environ for k in slurm)


def requested(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Whether `initialize` with these settings would start a multi-process run."""
    explicit = (coordinator, num_processes, process_id)
    env = ("MLLMJAX_COORDINATOR", "MLLMJAX_NUM_PROCESSES", "MLLMJAX_PROCESS_ID")
    # MLLMJAX_DISTRIBUTED and SLURM are _cluster_detected's.
    return any(x is not None for x in explicit) or any(os.environ.get(k) for k in env) or _cluster_detected()


def initialize(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Start jax.distributed if this is a multi-process run; returns whether it is one.

    Must run before anything touches a JAX backend. Explicit arguments win over the MLLMJAX_*
    environment variables, which win over cluster detection."""
    global _started
    if _started:
        return True
    env = os.environ
    coordinator = coordinator or env.get("MLLMJAX_COORDINATOR") or None
    try:
        if num_processes is None and env.get("MLLMJAX_NUM_PROCESSES"):
            num_processes = int(env["MLLMJAX_NUM_PROCESSES"])
        if process_id is None and env.get("MLLMJAX_PROCESS_ID"):
            process_id = int(env["MLLMJAX_PROCESS_ID"])
    except ValueError as e:
        raise BadInputError(f"MLLMJAX_NUM_PROCESSES / MLLMJAX_PROCESS_ID must be integers: {e}") from None
    explicit = (coordinator, num_processes, process_id)
    if any(x is not None for x in explicit):
        if any(x is None for x in explicit):
            raise BadInputError(
                "a multi-host run needs all of --coordinator, --num-processes and --process-id"
            )
        if not 0 <= process_id < num_processes:
            raise BadInputError(f"--process-id must be in [0, {num_processes}), got {process_id}")
        if ":" not in coordinator:
            raise BadInputError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    elif not _cluster_detected():
        return False
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # the CPU backend only
    if all(x is not None for x in explicit):
        jax.distributed.initialize(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    else:
        jax.distributed.initialize()
    _started = True
    return True


def is_primary() -> bool:
    """Process 0: the one that writes metadata and prints."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier of this name (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def shared_token() -> str:
    """A random hex token that is the same on every process (process 0's)."""
    token = uuid.uuid4().hex[:8]
    if jax.process_count() == 1:
        return token
    from jax.experimental import multihost_utils

    raw = np.frombuffer(bytes.fromhex(token), np.uint8).astype(np.int32)
    agreed = multihost_utils.broadcast_one_to_all(raw)
    return bytes(np.asarray(agreed, np.uint8).tolist()).hex()


def to_host(x: jax.Array | np.ndarray) -> np.ndarray:
    """The whole value of a (possibly multi-host) array as numpy, on every process.

    An array whose shards all live in this process (or that every process holds whole) is read
    directly; a sharded global array is gathered from every process first."""
    if not isinstance(x, jax.Array) or x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is true on any of them (a collective: all must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.asarray([flag], np.int32))).any())


def process_share(n: int) -> slice:
    """This process's contiguous share of n items (sizes differ by at most one; earlier processes take
    the extra ones). With one process, all of them."""
    count, index = jax.process_count(), jax.process_index()
    base, extra = divmod(n, count)
    start = index * base + min(index, extra)
    return slice(start, start + base + (1 if index < extra else 0))


def allgather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` (any picklable value), in process order (a collective: all must call it).

    The values travel as pickled bytes through the JAX collectives between our own processes."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    raw = np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([raw.size], np.int64))).reshape(-1)
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: raw.size] = raw
    everything = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(sizes), -1)
    return [pickle.loads(everything[i, : int(sizes[i])].tobytes()) for i in range(len(sizes))]


def _process_devices(index: int) -> list[Any]:
    return [d for d in jax.devices() if d.process_index == index]


def decode_mesh(spec: str, flag: str = "--mesh") -> Mesh:
    """Where rollouts decode, parsed from a --mesh string: the mesh of `spec` over every device with one
    process, and over this host's own devices (`local_mesh`) in a multi-host run."""
    from mllmjax.sharding import make_mesh

    return make_mesh(spec) if jax.process_count() == 1 else local_mesh(spec, flag)


def local_mesh(spec: str, flag: str = "--mesh") -> Mesh:
    """A mesh of this process's own devices laid out by `spec` (e.g. 'tensor=-1'): where each host
    decodes its share of a multi-host run's prompts."""
    from mllmjax.sharding import make_mesh

    devices = _process_devices(jax.process_index())
    try:
        return make_mesh(spec, devices)
    except BadInputError as e:
        raise BadInputError(
            f"{flag} {spec!r} does not fit one host's {len(devices)} devices: in a multi-host run rollouts "
            f"run on each host's own devices, so give {flag} for one host ({e})"
        ) from None


def host_local_copy(tree: Any, shardings: Callable[[Mesh], Any], mesh: Mesh) -> Any:
    """The global arrays `tree` as arrays on this process's `mesh` (from `local_mesh`), laid out by
    `shardings(mesh)` (a tree of NamedShardings shaped like `tree`).

    Every process's local mesh is stacked on a leading "hosts" axis into one global mesh; the arrays
    are resharded onto it replicated over "hosts" (one all-gather across hosts, in device memory), and
    this process's shards of that are exactly a whole copy on its own devices. A collective: every
    process must call it, each with its own local mesh of one shape."""
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings(mesh))
    hosts = Mesh(np.stack(_local_grids(mesh)), ("hosts", *mesh.axis_names))
    replicated = jax.device_put(tree, shardings(hosts))
    return jax.tree.map(
        lambda x, s: jax.make_array_from_single_device_arrays(
            x.shape, s, [shard.data for shard in x.addressable_shards]
        ),
        replicated,
        shardings(mesh),
    )


def _local_grids(mesh: Mesh) -> list[np.ndarray]:
    """Every process's local device grid, in process order, given this process's `mesh`: the grids are
    exchanged as device ids, so each process's layout is the one it built (a collective)."""
    ids = allgather_objects(np.vectorize(lambda d: d.id, otypes=[np.int64])(mesh.devices))
    by_id = {d.id: d for d in jax.devices()}
    grids = [np.vectorize(by_id.__getitem__, otypes=[object])(grid) for grid in ids]
    if any(grid.shape != mesh.devices.shape for grid in grids):
        raise BadInputError(f"every host must decode on a mesh of one shape; got {[g.shape for g in grids]}")
    return grids
