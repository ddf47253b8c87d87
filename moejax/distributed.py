"""Multi-host start-up on JAX's own multi-controller runtime (`jax.distributed`).

Every process runs the same `moejax train ...` command. How the processes find each other:
  1. explicit flags `--coordinator HOST:PORT --num-processes N --process-id I` (or the env vars
     MOEJAX_COORDINATOR / MOEJAX_NUM_PROCESSES / MOEJAX_PROCESS_ID that scripts/launch_local.sh sets);
  2. a TPU pod slice or a SLURM job: detected by `jax.distributed.initialize()` itself from the environment
     (TPU metadata; SLURM_* variables) — nothing to pass;
  3. otherwise a single process.
On CPU (local multi-process testing) collectives go through gloo. A process that dies is noticed by the
coordinator's heartbeat: the survivors fail within `MOEJAX_HEARTBEAT_S` seconds (default 30) instead of hanging.
"""

from __future__ import annotations

import os

_INITIALIZED = False


def _env_int(name: str) -> int | None:
  v = os.environ.get(name)
  return int(v) if v not in (None, "") else None


def _in_slurm_job() -> bool:
  return "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1


def _on_tpu_pod() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_devices: int | None = None) -> None:
  """Start the multi-controller runtime if this is a multi-process run. Idempotent. Must run before any JAX
  computation (and, for `local_devices`, before JAX is imported anywhere that initializes a backend)."""
  global _INITIALIZED
  if _INITIALIZED:
    return
  coordinator = coordinator or os.environ.get("MOEJAX_COORDINATOR")
  num_processes = num_processes if num_processes is not None else _env_int("MOEJAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _env_int("MOEJAX_PROCESS_ID")
  local_devices = local_devices if local_devices is not None else _env_int("MOEJAX_LOCAL_DEVICES")
  if local_devices:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
      os.environ["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={local_devices}").strip()
  import jax

  heartbeat = _env_int("MOEJAX_HEARTBEAT_S") or 30
  if coordinator:
    if num_processes is None or process_id is None:
      from moejax import config

      raise config.ConfigError("--coordinator needs --num-processes and --process-id (or MOEJAX_NUM_PROCESSES / "
                               "MOEJAX_PROCESS_ID)")
    if jax.config.jax_platforms in (None, "", "cpu") and os.environ.get("JAX_PLATFORMS", "cpu") == "cpu":
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id, initialization_timeout=120,
                               heartbeat_timeout_seconds=heartbeat, shutdown_timeout_seconds=heartbeat)
  elif _in_slurm_job() or _on_tpu_pod():
    jax.distributed.initialize(heartbeat_timeout_seconds=max(heartbeat, 100))
  _INITIALIZED = True
