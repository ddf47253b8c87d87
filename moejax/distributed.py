"""Multi-host start-up on JAX's own multi-controller runtime (`jax.distributed`), and failure detection.

Every process runs the same `moejax train ...` command. How the processes find each other (`detect`):
  1. explicit: `--coordinator HOST:PORT --num-processes N --process-id I` (or MOEJAX_COORDINATOR /
     MOEJAX_NUM_PROCESSES / MOEJAX_PROCESS_ID); scripts/launch_local.sh uses this on one machine;
  2. SLURM (`srun` with more than one task): read from SLURM_* exactly as JAX's own SlurmCluster does, plus
     which GPUs a task owns (one task per node: all of the node's; one task per GPU: its own);
  3. a Cloud TPU VM: `jax.distributed.initialize()` asks the TPU metadata server (GCE) or reads
     TPU_WORKER_HOSTNAMES (GKE) itself;
  4. otherwise a single process.
On CPU, collectives between processes go through gloo.

Failure detection. JAX's runtime already stops the survivors when process 0 (which hosts the coordination
service) dies. When another process dies, though, the survivors block inside a gloo/NCCL collective until
the service misses that process's heartbeats, and then the runtime aborts them with a C++ stack trace. So each
process also runs a small watchdog thread: it bumps its own counter in the coordination service's key-value
store every `MOEJAX_HEARTBEAT_S / 10` seconds and reads everyone else's; a counter that stops moving for
MOEJAX_HEARTBEAT_S seconds (default 60), or a process that reports an uncaught exception, makes every other
process print which process was lost and exit with status `EXIT_LOST` (75, "temporary failure: retry").
An uncaught exception in one process (e.g. a collective that failed because a peer vanished) exits that process
at once after telling the others, instead of waiting in JAX's shutdown barrier. Re-running the same command
resumes from the last checkpoint. JAX's own heartbeat stays on as a backstop, with a 4x longer timeout. At a
normal exit the watchdog keeps beating through JAX's shutdown barrier and is stopped and joined right after
it, so no thread of ours is inside a runtime call when the interpreter finalizes.
"""

from __future__ import annotations

import atexit
import dataclasses
import glob
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import Any

from moejax import config

EXIT_LOST = 75  # sysexits.h EX_TEMPFAIL: the run can be resumed by running it again
DEFAULT_HEARTBEAT_S = 60
_KEY = "moejax/alive/"
_FAILED = "failed"

_INITIALIZED = False
_WATCHDOG: _Watchdog | None = None


@dataclasses.dataclass(frozen=True)
class Launch:
  """How this process joins the run. `local_device_ids=None`: every device this process can see."""

  kind: str  # explicit | slurm | tpu | single
  coordinator: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  local_device_ids: tuple[int, ...] | None = None


# ----------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------

# The variables JAX's SlurmCluster requires (jax/_src/clusters/slurm_cluster.py); srun sets them in each task.
_SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
_TPU_ENV_VARS = ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")
_GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips show up as PCI devices of this vendor (what JAX's hardware_utils reads)


def _int_env(env: Mapping[str, str], name: str) -> int | None:
  v = env.get(name)
  if v in (None, ""):
    return None
  try:
    return int(v)
  except ValueError:
    raise config.ConfigError(f"{name}={v!r} is not an integer") from None


def slurm_coordinator(env: Mapping[str, str]) -> str:
  """`first-node-of-the-step:port`, the port derived from the job id (or JAX_COORDINATOR_PORT) so that every
  task computes the same address without talking to the others. The same rule as JAX's SlurmCluster."""
  port = env.get("JAX_COORDINATOR_PORT") or str(int(env["SLURM_JOB_ID"]) % 2**12 + (65535 - 2**12 + 1))
  nodes = env["SLURM_STEP_NODELIST"]  # "node001", "node001,gpu2", "node[001-015],gpu2", "node[001,007-015]"
  cut = next((i for i, ch in enumerate(nodes) if ch in ",["), len(nodes))
  if cut == len(nodes) or nodes[cut] == ",":
    return f"{nodes[:cut]}:{port}"
  rest = nodes[cut + 1:]
  end = next((i for i, ch in enumerate(rest) if ch in ",-]"), len(rest))
  return f"{nodes[:cut]}{rest[:end]}:{port}"


def _slurm_local_devices(env: Mapping[str, str], ntasks: int) -> tuple[int, ...] | None:
  """Which of the node's accelerators this task drives. JAX's own rule is "device SLURM_LOCALID", i.e. one task
  per GPU that sees all GPUs; with one task per node that would leave all but one GPU idle, and where SLURM
  already bound one GPU per task (--gpus-per-task=1) device SLURM_LOCALID does not exist."""
  nodes = _int_env(env, "SLURM_STEP_NUM_NODES") or _int_env(env, "SLURM_NNODES") or 1
  if ntasks <= nodes:  # one task per node: all of its GPUs
    return None
  visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
  if len(visible) == 1:  # SLURM bound this task to one GPU
    return None
  return (_int_env(env, "SLURM_LOCALID") or 0,)


def _tpu_chips_present() -> bool:
  for path in glob.glob("/sys/bus/pci/devices/*/vendor"):
    try:
      with open(path) as f:
        if f.read().strip() == _GOOGLE_PCI_VENDOR:
          return True
    except OSError:
      continue
  return False


def detect(env: Mapping[str, str] | None = None, coordinator: str | None = None, num_processes: int | None = None,
           process_id: int | None = None, tpu_chips: bool | None = None) -> Launch:
  """Decide how this process starts, from flags first and then the environment. Pure except for the TPU chip
  probe (pass `tpu_chips` to skip it)."""
  env = os.environ if env is None else env
  coordinator = coordinator or env.get("MOEJAX_COORDINATOR") or None
  num_processes = num_processes if num_processes is not None else _int_env(env, "MOEJAX_NUM_PROCESSES")
  process_id = process_id if process_id is not None else _int_env(env, "MOEJAX_PROCESS_ID")
  if coordinator or num_processes is not None or process_id is not None:
    missing = [n for n, v in (("--coordinator", coordinator), ("--num-processes", num_processes),
                              ("--process-id", process_id)) if v is None]
    if missing:
      raise config.ConfigError(f"a multi-process run needs --coordinator, --num-processes and --process-id "
                               f"(or MOEJAX_COORDINATOR / MOEJAX_NUM_PROCESSES / MOEJAX_PROCESS_ID); missing "
                               f"{', '.join(missing)}")
    if ":" not in coordinator:
      raise config.ConfigError(f"--coordinator={coordinator!r} must be HOST:PORT (process 0's address)")
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise config.ConfigError(f"--process-id={process_id} must be in [0, --num-processes={num_processes})")
    if num_processes == 1:
      return Launch("single")
    return Launch("explicit", coordinator, num_processes, process_id)
  if all(v in env for v in _SLURM_VARS):
    ntasks = _int_env(env, "SLURM_NTASKS") or 1
    if ntasks > 1:
      return Launch("slurm", slurm_coordinator(env), ntasks, _int_env(env, "SLURM_PROCID"),
                    _slurm_local_devices(env, ntasks))
  if env.get("JAX_PLATFORMS", "").lower() not in ("cpu", "cuda", "gpu", "rocm"):
    if any(env.get(v) for v in _TPU_ENV_VARS) or (tpu_chips if tpu_chips is not None else _tpu_chips_present()):
      return Launch("tpu")
  return Launch("single")


# ----------------------------------------------------------------------------------------------------------
# Start-up
# ----------------------------------------------------------------------------------------------------------


def heartbeat_s() -> int:
  v = _int_env(os.environ, "MOEJAX_HEARTBEAT_S")
  if v is not None and v < 1:
    raise config.ConfigError(f"MOEJAX_HEARTBEAT_S={v} must be >= 1 (seconds)")
  return v or DEFAULT_HEARTBEAT_S


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               local_devices: int | None = None) -> Launch:
  """Join the multi-controller runtime if this is a multi-process run; start the watchdog. Idempotent. Must run
  before any JAX computation (and, for `local_devices`, before anything initializes a JAX backend)."""
  global _INITIALIZED
  launch = detect(coordinator=coordinator, num_processes=num_processes, process_id=process_id)
  if _INITIALIZED:
    return launch
  local_devices = local_devices if local_devices is not None else _int_env(os.environ, "MOEJAX_LOCAL_DEVICES")
  if local_devices:  # an explicit count replaces one inherited from the environment (e.g. a test's 8)
    flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags.strip()} --xla_force_host_platform_device_count={local_devices}".strip()
  import jax

  if launch.kind != "single":
    hb = heartbeat_s()
    # CPU collectives between processes (local multi-process runs); no effect on GPU/TPU computations.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # JAX's heartbeat is the backstop behind the watchdog. It fires anywhere from about half to all of its
    # timeout after a process dies (measured: 10.7-18 s at 20 s), so it gets 4x ours to let ours speak first.
    timeouts = dict(initialization_timeout=max(120, hb), heartbeat_timeout_seconds=4 * hb,
                    shutdown_timeout_seconds=2 * hb)
    if launch.kind == "tpu":
      try:
        jax.distributed.initialize(**timeouts)
      except ValueError as e:  # a TPU VM the metadata server does not describe as part of a slice
        if "coordinator_address" not in str(e):
          raise
        launch = Launch("single")
    else:
      jax.distributed.initialize(
        coordinator_address=launch.coordinator, num_processes=launch.num_processes, process_id=launch.process_id,
        local_device_ids=list(launch.local_device_ids) if launch.local_device_ids is not None else None,
        cluster_detection_method="deactivate", **timeouts)
    _restore_default_sigterm()
    if jax.process_count() > 1:
      _start_watchdog(jax.process_index(), jax.process_count(), hb)
  _INITIALIZED = True
  return launch


def _restore_default_sigterm() -> None:
  """`jax.distributed.initialize` installs a C++ SIGTERM handler (its preemption notifier) that only records the
  signal, so a SIGTERM before the training loop takes over would be swallowed and the process would keep
  running. Put the default back; the training loop installs its own checkpoint-then-exit handler."""
  if threading.current_thread() is threading.main_thread():
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


# ----------------------------------------------------------------------------------------------------------
# Watchdog
# ----------------------------------------------------------------------------------------------------------


class _Watchdog(threading.Thread):
  """Publishes this process's heartbeat and checks everyone else's, through the coordination service."""

  def __init__(self, client: Any, process_id: int, num_processes: int, timeout_s: float,
               on_lost: Any = None):
    super().__init__(name="moejax-watchdog", daemon=True)
    self.client, self.pid, self.n, self.timeout = client, process_id, num_processes, float(timeout_s)
    self.interval = max(0.1, self.timeout / 10)
    self.on_lost = on_lost or _exit_lost
    self.exiting = threading.Event()  # set at interpreter exit: keep beating (peers may still be working), judge no one
    self.failed = threading.Event()  # set by an uncaught exception in this process
    self._halt = threading.Event()

  def run(self) -> None:
    start = time.monotonic()
    last_seen: dict[int, tuple[str | None, float]] = {p: (None, start) for p in range(self.n) if p != self.pid}
    last_ok, beat = start, 0
    while not self._halt.wait(self.interval):
      now = time.monotonic()
      try:
        if self.failed.is_set():
          self.client.key_value_set(f"{_KEY}{self.pid}", _FAILED, allow_overwrite=True)
          return
        beat += 1
        self.client.key_value_set(f"{_KEY}{self.pid}", str(beat), allow_overwrite=True)
        values = {k.rsplit("/", 1)[-1]: v for k, v in self.client.key_value_dir_get(_KEY)}
        last_ok = now
      except Exception as e:  # the coordination service is gone: JAX's runtime normally stops us first
        if not self.exiting.is_set() and now - last_ok > self.timeout:
          self.on_lost(f"lost contact with the coordinator (process 0) for {now - last_ok:.0f} s "
                       f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
          return
        continue
      if self.exiting.is_set():
        continue
      for p, (old, since) in last_seen.items():
        v = values.get(str(p))
        if v == _FAILED:
          self.on_lost(f"process {p} of {self.n} failed (see its log for the error)")
          return
        if v != old:
          last_seen[p] = (v, now)
        elif now - since > self.timeout:
          state = "never sent a heartbeat" if v is None else f"sent no heartbeat for {now - since:.0f} s"
          self.on_lost(f"process {p} of {self.n} {state}: it died, was killed, or hangs")
          return

  def stop(self) -> None:
    self._halt.set()


def _exit_lost(what: str) -> None:
  import jax

  msg = (f"moejax: error: {what}. Stopping process {jax.process_index()} too (exit {EXIT_LOST}) rather than "
         f"wait in a collective forever. Re-run the same command on every process to resume from the last "
         f"checkpoint.")
  try:
    print(msg, file=sys.stderr, flush=True)
    sys.stdout.flush()
  finally:
    os._exit(EXIT_LOST)


def _start_watchdog(process_id: int, num_processes: int, timeout_s: float) -> None:
  try:  # the runtime client has no public accessor; a JAX that moved it only costs the watchdog
    from jax._src import distributed as jax_distributed

    client = jax_distributed.global_state.client
  except (ImportError, AttributeError) as e:
    print(f"moejax: warning: no watchdog for lost processes ({e}); JAX's heartbeat still stops the run",
          file=sys.stderr)
    return
  if client is None or _WATCHDOG is not None:
    return
  _install(_Watchdog(client, process_id, num_processes, timeout_s))


def _install(dog: _Watchdog) -> None:
  """Start `dog` and hook it into this process's exit paths."""
  global _WATCHDOG
  _WATCHDOG = dog
  dog.start()
  previous_hook = sys.excepthook

  def excepthook(etype, value, tb):
    previous_hook(etype, value, tb)  # the traceback first
    _fail_fast(dog, value)

  sys.excepthook = excepthook
  atexit.register(_at_exit, dog)  # registered after JAX's own atexit hook, so it runs first


def _at_exit(dog: _Watchdog) -> None:
  """A normal exit: pass JAX's shutdown barrier while still beating (slower peers are still working and judging
  this process by its heartbeat), then stop the watchdog and wait for it. A daemon thread still inside a runtime
  call when the interpreter finalizes is killed by a forced unwind that the C++ bindings catch, and the process
  aborts ("FATAL: exception not rethrown", exit 134) after the run has finished. JAX's own exit hook then finds
  the distributed system already shut down."""
  import jax

  dog.exiting.set()  # from here on: beat, judge nobody
  try:
    jax.distributed.shutdown()
  finally:
    dog.stop()
    dog.join(timeout=dog.timeout)


def _fail_fast(dog: _Watchdog | None, err: BaseException) -> None:
  """An uncaught exception in a multi-process run. Nothing after it can pass JAX's shutdown barrier (it would
  wait for peers stuck in a collective, then abort), so exit here, after telling the others."""
  if dog is None or not dog.is_alive():
    return
  import jax

  if isinstance(err, jax.errors.JaxRuntimeError):
    # Most likely a collective broke because a peer went away ("Gloo all-reduce failed: Connection reset by
    # peer"): give the watchdog one timeout to name the lost process; it exits with EXIT_LOST if it does.
    deadline = time.monotonic() + dog.timeout + 2 * dog.interval
    while dog.is_alive() and time.monotonic() < deadline:
      time.sleep(dog.interval)
  dog.failed.set()  # the others report "process i failed" at once instead of waiting out the timeout
  dog.join(timeout=max(1.0, 3 * dog.interval))
  print(f"moejax: error: process {dog.pid} of {dog.n} failed ({type(err).__name__}, above); the other processes "
        f"stop too. Re-run the same command on every process to resume from the last checkpoint.",
        file=sys.stderr, flush=True)
  os._exit(1)


def watchdog_running() -> bool:
  return _WATCHDOG is not None and _WATCHDOG.is_alive()
