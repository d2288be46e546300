"""Multi-host runs on JAX's own multi-controller runtime: one process per host, one global mesh.

Design decisions:
- `initialize` starts `jax.distributed` from explicit settings (`--coordinator HOST:PORT
  --num-processes N --process-id I`, or the same as MLLMJAX_COORDINATOR / MLLMJAX_NUM_PROCESSES /
  MLLMJAX_PROCESS_ID), or lets JAX detect the cluster: by itself in a SLURM job step of more than one
  task, and on request (MLLMJAX_DISTRIBUTED=1) anywhere JAX's detection works (TPU pod slices,
  Kubernetes, Open MPI). With none of these it does nothing: one process owns every device.
  On CPU it selects the gloo collectives, so several local processes can run one program (how the
  tests exercise this path).
- Every process runs the same program over the global mesh (`jax.devices()`), and host data that
  feeds it is the same on every process (every host reads the same records), so `jax.device_put`
  of host arrays onto global shardings needs no per-host bookkeeping; JAX checks that the values
  agree.
- Files: each process writes its own shards of a checkpoint (Orbax), process 0 alone writes the
  metadata, tokenizer and renames the finished directory into place; `barrier` keeps the others
  from running ahead of it. Console output comes from process 0 only.
"""

from __future__ import annotations

import os
import uuid

import jax
import numpy as np

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
