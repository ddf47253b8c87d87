"""Multi-host start-up and failure handling.

Fast: how a process decides to start (flags, SLURM, TPU) checked against JAX's own cluster detection; the
watchdog against an in-memory coordination service; scripts/launch_local.sh's process handling with a stand-in
binary. Slow (several real processes on localhost, gloo collectives): 2 processes x 4 CPU devices train the MoE
model with the expert axis spanning both processes and match a 1-process 8-device run; SIGTERM to one process
or to all -> same-step checkpoint -> exit 0 -> resume == uninterrupted; a killed process stops the other.
"""

import json
import os
import pathlib
import shlex
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import pytest
from run_helpers import sigterm_at_call

from moejax import checkpoint, config, distributed, metrics, registry, sharding, train, upcycle
from moejax import step as step_lib

ROOT = pathlib.Path(__file__).resolve().parent.parent
LAUNCH = ROOT / "scripts" / "launch_local.sh"


# ----------------------------------------------------------------------------------------------------------
# Detection
# ----------------------------------------------------------------------------------------------------------


def _slurm_env(**kw):
  env = {"SLURM_JOB_ID": "81234", "SLURM_STEP_NODELIST": "gpu[003-004]", "SLURM_NTASKS": "2",
         "SLURM_PROCID": "1", "SLURM_LOCALID": "0", "SLURM_STEP_NUM_NODES": "2"}
  env.update(kw)
  return {k: v for k, v in env.items() if v is not None}


def test_detect_explicit_flags_and_env():
  launch = distributed.detect({}, coordinator="10.0.0.1:1234", num_processes=4, process_id=3, tpu_chips=False)
  assert launch == distributed.Launch("explicit", "10.0.0.1:1234", 4, 3)
  env = {"MOEJAX_COORDINATOR": "h:9", "MOEJAX_NUM_PROCESSES": "2", "MOEJAX_PROCESS_ID": "0"}
  assert distributed.detect(env, tpu_chips=False) == distributed.Launch("explicit", "h:9", 2, 0)
  # flags win over the environment, and explicit wins over SLURM
  launch = distributed.detect({**env, **_slurm_env()}, process_id=1, tpu_chips=False)
  assert (launch.kind, launch.process_id) == ("explicit", 1)
  assert distributed.detect({}, coordinator="h:9", num_processes=1, process_id=0).kind == "single"


@pytest.mark.parametrize("kw, message", [
  (dict(coordinator="h:9"), "missing --num-processes, --process-id"),
  (dict(num_processes=2, process_id=0), "missing --coordinator"),
  (dict(coordinator="h", num_processes=2, process_id=0), "must be HOST:PORT"),
  (dict(coordinator="h:9", num_processes=2, process_id=2), "--process-id=2 must be in [0, --num-processes=2)"),
])
def test_detect_bad_explicit_flags(kw, message):
  with pytest.raises(config.ConfigError) as e:
    distributed.detect({}, tpu_chips=False, **kw)
  assert message in str(e.value)


def test_detect_bad_env_value_names_it():
  with pytest.raises(config.ConfigError, match="MOEJAX_NUM_PROCESSES='two' is not an integer"):
    distributed.detect({"MOEJAX_COORDINATOR": "h:1", "MOEJAX_NUM_PROCESSES": "two"}, tpu_chips=False)


def test_detect_slurm_one_task_per_node_uses_all_local_gpus():
  launch = distributed.detect(_slurm_env(), tpu_chips=False)
  assert launch == distributed.Launch("slurm", "gpu003:" + str(81234 % 4096 + 61440), 2, 1, None)


def test_detect_slurm_one_task_per_gpu():
  env = _slurm_env(SLURM_NTASKS="16", SLURM_PROCID="13", SLURM_LOCALID="5")
  launch = distributed.detect(env, tpu_chips=False)
  assert (launch.num_processes, launch.process_id, launch.local_device_ids) == (16, 13, (5,))
  # SLURM already bound one GPU to the task (--gpus-per-task=1): it is device 0 of what the task sees
  launch = distributed.detect({**env, "CUDA_VISIBLE_DEVICES": "5"}, tpu_chips=False)
  assert launch.local_device_ids is None


def test_detect_slurm_single_task_or_batch_step_is_single_process():
  assert distributed.detect(_slurm_env(SLURM_NTASKS="1"), tpu_chips=False).kind == "single"
  # the batch script itself (no srun step): JAX's SlurmCluster needs SLURM_STEP_NODELIST, and so do we
  assert distributed.detect(_slurm_env(SLURM_STEP_NODELIST=None), tpu_chips=False).kind == "single"


@pytest.mark.parametrize("nodelist", ["node001", "node001,gpu2", "node[001-015],gpu2", "node[001,007-015]",
                                      "a-b[10-11]", "node[099,100]"])
@pytest.mark.parametrize("port", [None, "7777"])
def test_slurm_coordinator_matches_jax(monkeypatch, nodelist, port):
  """Our SLURM reading against JAX's own SlurmCluster (the reference), on the node list formats SLURM writes."""
  from jax._src.clusters import slurm_cluster

  env = _slurm_env(SLURM_STEP_NODELIST=nodelist, SLURM_NTASKS="8", SLURM_PROCID="6", SLURM_LOCALID="2",
                   SLURM_STEP_NUM_NODES="4")
  if port:
    env["JAX_COORDINATOR_PORT"] = port
  for k in list(os.environ):
    if k.startswith("SLURM_") or k == "JAX_COORDINATOR_PORT":
      monkeypatch.delenv(k)
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  jax_slurm = slurm_cluster.SlurmCluster
  assert jax_slurm.is_env_present()
  launch = distributed.detect(env, tpu_chips=False)
  assert launch.coordinator == jax_slurm.get_coordinator_address(None, port)
  assert launch.num_processes == jax_slurm.get_process_count()
  assert launch.process_id == jax_slurm.get_process_id()
  assert launch.local_device_ids == (jax_slurm.get_local_process_id(),)  # 2 tasks per node: one GPU each


def test_slurm_coordinator_single_bracketed_node():
  # JAX's parser keeps the "]" here ("node001]:port"); ours does not.
  assert distributed.slurm_coordinator({"SLURM_JOB_ID": "1", "SLURM_STEP_NODELIST": "node[001]"}) == \
    "node001:61441"


def test_detect_tpu():
  assert distributed.detect({}, tpu_chips=True).kind == "tpu"  # Cloud TPU VM: JAX asks the metadata server
  gke = {"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3", "TPU_WORKER_ID": "2"}
  assert distributed.detect(gke, tpu_chips=False).kind == "tpu"
  assert distributed.detect({**gke, "JAX_PLATFORMS": "cpu"}, tpu_chips=True).kind == "single"
  assert distributed.detect({}, tpu_chips=False).kind == "single"


def test_heartbeat_env(monkeypatch):
  monkeypatch.delenv("MOEJAX_HEARTBEAT_S", raising=False)
  assert distributed.heartbeat_s() == distributed.DEFAULT_HEARTBEAT_S
  monkeypatch.setenv("MOEJAX_HEARTBEAT_S", "7")
  assert distributed.heartbeat_s() == 7
  monkeypatch.setenv("MOEJAX_HEARTBEAT_S", "0")
  with pytest.raises(config.ConfigError, match="MOEJAX_HEARTBEAT_S=0 must be >= 1"):
    distributed.heartbeat_s()


# ----------------------------------------------------------------------------------------------------------
# Watchdog, against an in-memory stand-in for the coordination service's key-value store
# ----------------------------------------------------------------------------------------------------------


class _KV:
  def __init__(self):
    self.data: dict[str, str] = {}
    self.lock = threading.Lock()
    self.broken = False

  def key_value_set(self, key, value, allow_overwrite=False):
    with self.lock:
      if self.broken:
        raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
      assert allow_overwrite or key not in self.data
      self.data[key] = value

  def key_value_dir_get(self, prefix):
    with self.lock:
      if self.broken:
        raise RuntimeError("UNAVAILABLE: Failed to send RPC to coordination service")
      return [(k, v) for k, v in self.data.items() if k.startswith(prefix)]


class _Reports:
  def __init__(self):
    self.items: list[tuple[float, str]] = []

  def __call__(self, what):
    self.items.append((time.monotonic(), what))

  def wait(self, seconds):
    deadline = time.monotonic() + seconds
    while not self.items and time.monotonic() < deadline:
      time.sleep(0.01)
    return self.items


def _dogs(kv, n=2, timeout=1.0):
  reports = [_Reports() for _ in range(n)]
  dogs = [distributed._Watchdog(kv, p, n, timeout, on_lost=reports[p]) for p in range(n)]
  return dogs, reports


def test_watchdog_reports_a_silent_process_within_the_timeout():
  kv = _KV()
  (d0, d1, d2), (r0, r1, r2) = _dogs(kv, n=3)
  for d in (d0, d1, d2):
    d.start()
  time.sleep(2.5)  # 2.5 timeouts with everyone beating: nobody is reported
  assert not r0.items and not r1.items and not r2.items
  d2.stop()  # process 2 dies
  t_dead = time.monotonic()
  items = r0.wait(10)
  assert items and "process 2 of 3 sent no heartbeat" in items[0][1] and "died" in items[0][1]
  assert 0.5 <= items[0][0] - t_dead <= 1.0 + 3.0  # about one timeout (slack for a busy machine)
  assert r1.wait(10) and "process 2 of 3" in r1.items[0][1]
  d0.stop(), d1.stop()


def test_watchdog_process_that_never_starts():
  kv = _KV()
  (d0, _), (r0, _) = _dogs(kv)
  t0 = time.monotonic()
  d0.start()
  items = r0.wait(10)
  assert items and "process 1 of 2 never sent a heartbeat" in items[0][1]
  assert items[0][0] - t0 >= 0.9


def test_watchdog_failed_process_is_reported_at_once():
  kv = _KV()
  (d0, d1), (r0, _) = _dogs(kv, timeout=30.0)  # long timeout: only the "failed" mark can trigger a report
  d0.interval = d1.interval = 0.05
  d0.start(), d1.start()
  time.sleep(0.3)
  t_fail = time.monotonic()
  d1.failed.set()  # what the excepthook does on an uncaught exception
  items = r0.wait(10)
  assert items and items[0][1] == "process 1 of 2 failed (see its log for the error)"
  assert items[0][0] - t_fail < 5.0
  assert kv.data[distributed._KEY + "1"] == distributed._FAILED
  d0.stop()


def test_watchdog_is_quiet_while_exiting_and_reports_a_lost_coordinator():
  kv = _KV()
  (d0, d1), (r0, _) = _dogs(kv, timeout=0.5)
  d0.start(), d1.start()
  time.sleep(0.3)
  d0.exiting.set()  # at interpreter exit this process waits in JAX's shutdown barrier: it judges nobody
  d1.stop()
  time.sleep(1.5)
  assert not r0.items and d0.is_alive()
  d0.stop()
  (d2, d3), (r2, _) = _dogs(kv, timeout=0.5)
  d2.start()
  kv.broken = True  # the coordination service (in process 0) is gone
  items = r2.wait(10)
  assert items and items[0][1].startswith("lost contact with the coordinator (process 0)")


EXIT_SCRIPT = r'''
import sys, time
import jax
from moejax import distributed

class KV:  # process 1's counter keeps moving (alive) unless PEER=dead
  def key_value_set(self, key, value, allow_overwrite=False):
    print("SET", key, value, flush=True)
  def key_value_dir_get(self, prefix):
    return [("moejax/alive/1", "7" if sys.argv[2] == "dead" else str(time.monotonic()))]

dog = distributed._Watchdog(KV(), 0, 2, 1.0)
distributed._install(dog)
time.sleep(0.3)
if sys.argv[1] == "runtime":
  raise jax.errors.JaxRuntimeError("UNKNOWN: Gloo all-reduce failed: Connection reset by peer")
raise ValueError("disk full on this host")
'''


@pytest.mark.parametrize("error, peer, code, message", [
  ("value", "alive", 1, "moejax: error: process 0 of 2 failed (ValueError, above); the other processes stop too"),
  ("runtime", "alive", 1, "moejax: error: process 0 of 2 failed (JaxRuntimeError, above)"),
  ("runtime", "dead", distributed.EXIT_LOST, "moejax: error: process 1 of 2 sent no heartbeat"),
])
def test_uncaught_exception_exits_at_once_and_tells_the_others(tmp_path, error, peer, code, message):
  """An exception exits the process (no wait in JAX's shutdown barrier) after marking it failed for the others;
  when a collective broke (JaxRuntimeError) the watchdog first gets a timeout to name a lost peer."""
  script = tmp_path / "exits.py"
  script.write_text(EXIT_SCRIPT)
  t0 = time.monotonic()
  p = subprocess.run([sys.executable, str(script), error, peer], capture_output=True, text=True, timeout=120)
  assert p.returncode == code, (p.stdout, p.stderr)
  assert message in p.stderr and "Traceback" in p.stderr, p.stderr
  assert "Re-run the same command" in p.stderr
  failed = "SET moejax/alive/0 failed" in p.stdout
  assert failed == (code == 1), p.stdout  # the others learn of the failure from the key-value store
  assert time.monotonic() - t0 < 60


CLEAN_EXIT_SCRIPT = r'''
import atexit, threading, time
import jax
from moejax import distributed

# Events go into one list (list.append is atomic) and are printed once, last: two threads printing lines can
# interleave inside a line ("SET 3BARRIER start"), and a loaded machine can delay either thread by any amount,
# so the test reads only orders that the code guarantees.
events = []
in_barrier, beat_in_barrier = threading.Event(), threading.Event()
atexit.register(lambda: print("\n".join(events), flush=True))  # registered first: runs last

class KV:
  def key_value_set(self, key, value, allow_overwrite=False):
    events.append(f"SET {value}")
    if in_barrier.is_set():
      beat_in_barrier.set()
  def key_value_dir_get(self, prefix):
    return [("moejax/alive/1", str(time.monotonic()))]

def slow_barrier():  # JAX's shutdown barrier, waiting for a slower peer: here, until this process has beaten
  events.append("BARRIER start")
  in_barrier.set()
  events.append(f"BARRIER beat seen {beat_in_barrier.wait(60)}")
  events.append("BARRIER end")

jax.distributed.shutdown = slow_barrier
dog = distributed._Watchdog(KV(), 0, 2, 1.0)
atexit.register(lambda: events.append(f"AFTER alive {dog.is_alive()}"))  # runs after moejax's hook
distributed._install(dog)
time.sleep(0.3)
'''


def test_normal_exit_beats_through_the_shutdown_barrier_then_stops_the_watchdog(tmp_path):
  """The watchdog is a daemon thread in and out of runtime calls; one still running when the interpreter
  finalizes can abort a finished run (exit 134). At exit it must keep beating through the barrier, then stop."""
  script = tmp_path / "clean_exit.py"
  script.write_text(CLEAN_EXIT_SCRIPT)
  p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=180)
  assert p.returncode == 0, (p.stdout, p.stderr)
  lines = p.stdout.splitlines()
  start, end, after = lines.index("BARRIER start"), lines.index("BARRIER end"), lines.index("AFTER alive False")
  assert start < end < after, lines
  assert "BARRIER beat seen True" in lines[start:end], lines  # beating while in the barrier
  assert any(line.startswith("SET ") for line in lines[start:end]), lines
  assert not any(line.startswith("SET ") for line in lines[after:]), lines


# ----------------------------------------------------------------------------------------------------------
# scripts/launch_local.sh with a stand-in for `moejax` (process handling only; no JAX)
# ----------------------------------------------------------------------------------------------------------

FAKE = r'''
import os, signal, sys, time
args = sys.argv[1:]
pid = int(args[args.index("--process-id") + 1])
print("args", " ".join(args), flush=True)
print("env", os.environ.get("JAX_PLATFORMS"), os.environ.get("PYTHONUNBUFFERED"), flush=True)
mode = os.environ["FAKE_MODE"]
if mode == "ok":
  sys.exit(0)
if mode == "one_fails":
  if pid == 1:
    sys.exit(3)
  time.sleep(600)  # a straggler that never notices
if mode == "term":
  signal.signal(signal.SIGTERM, lambda *a: (print("checkpointed", flush=True), sys.exit(0)))
  print("ready", flush=True)
  time.sleep(600)
'''


def _launch(tmp_path, n, *args, mode="ok", **env):
  fake = tmp_path / "fake_moejax.py"
  fake.write_text(FAKE)
  e = dict(os.environ, MOEJAX_BIN=f"{sys.executable} {fake}", FAKE_MODE=mode, **env)
  # SIGINT at its default in the launcher: a test run started as a background job (`pytest ... &` from a script)
  # ignores SIGINT, and bash cannot trap a signal that was ignored when it started, as a terminal's launcher can.
  return subprocess.Popen(["bash", str(LAUNCH), str(n), *args], env=e, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, start_new_session=True,
                          preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_launch_local_passes_args_and_prefixes_output(tmp_path):
  p = _launch(tmp_path, 4, "lm_x_tiny", "train.steps=3", "--workdir", "/w", "--local-devices", "3")
  out, err = p.communicate(timeout=60)
  assert p.returncode == 0, err
  for i in range(4):
    lines = [x for x in out.splitlines() if x.startswith(f"[p{i}] args")]
    assert len(lines) == 1, out
    args = lines[0].split()[2:]
    assert args[:4] == ["train", "lm_x_tiny", "train.steps=3", "--workdir"]
    assert args[args.index("--process-id") + 1] == str(i) and args[args.index("--num-processes") + 1] == "4"
    assert args[args.index("--local-devices") + 1] == "3"
    host, port = args[args.index("--coordinator") + 1].split(":")
    assert host == "127.0.0.1" and 1 <= int(port) < 65536
    assert f"[p{i}] env cpu 1" in out
  assert "all 4 processes finished" in err


def test_launch_local_default_devices(tmp_path):
  for n, d in ((1, 8), (2, 4), (8, 1), (3, 1)):
    out, err = _launch(tmp_path, n, "x").communicate(timeout=60)
    args = [x for x in out.splitlines() if x.startswith("[p0] args")][0].split()
    assert args[args.index("--local-devices") + 1] == str(d), (n, out)


def test_launch_local_propagates_failure_and_kills_stragglers(tmp_path):
  t0 = time.monotonic()
  p = _launch(tmp_path, 2, "x", mode="one_fails", MOEJAX_LAUNCH_GRACE_S="1")
  out, err = p.communicate(timeout=60)
  assert p.returncode == 3, (out, err)
  assert "process 1 exited with status 3" in err
  assert "process 0 still running 1s after process 1 failed: killing it" in err
  assert "FAILED (exit statuses: p0=137 p1=3)" in err and "re-run the same command to resume" in err
  assert time.monotonic() - t0 < 30


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_launch_local_forwards_sigterm_or_ctrl_c_to_every_process_as_sigterm(tmp_path, sig):
  """The stand-in, like `moejax train`, checkpoints on SIGTERM only; a Ctrl-C (SIGINT) to the launcher must reach
  it as SIGTERM (processes started with & by a script ignore SIGINT: forwarded as is, it was lost)."""
  p = _launch(tmp_path, 2, "x", mode="term")
  lines = []
  deadline = time.monotonic() + 60
  while sum("ready" in x for x in lines) < 2 and time.monotonic() < deadline:
    lines.append(p.stdout.readline())
  p.send_signal(sig)
  try:
    out, err = p.communicate(timeout=30)
  except subprocess.TimeoutExpired:
    os.killpg(p.pid, signal.SIGKILL)
    raise AssertionError(f"{sig.name} to the launcher did not stop its processes") from None
  out = "".join(lines) + out
  assert p.returncode == 0, (out, err)
  assert "[p0] checkpointed" in out and "[p1] checkpointed" in out
  assert f"got {sig.name}, forwarding SIGTERM to all 2 processes" in err


def test_launch_local_stopped_while_it_starts_processes_leaves_none_running(tmp_path):
  """A Ctrl-C that arrives while the launcher is still starting processes (the header is printed, the processes
  are not all up): those already started get SIGTERM, no more are started, and the launcher exits. With its
  traps set only after every process had started, such a signal killed the launcher and left them running."""
  p = _launch(tmp_path, 4, "x", mode="term")
  err_lines = [p.stderr.readline()]
  assert err_lines[0].startswith("launch_local: 4 processes"), err_lines
  p.send_signal(signal.SIGINT)
  try:
    p.wait(timeout=30)
  except subprocess.TimeoutExpired:
    os.killpg(p.pid, signal.SIGKILL)
    raise AssertionError("SIGINT while starting did not stop the launcher") from None
  # Nothing is left in the launcher's process group: every process it started has exited (their output
  # prefixers, children of the processes, may take a moment to see end of input and go).
  deadline = time.monotonic() + 10
  while True:
    try:
      os.killpg(p.pid, 0)
    except ProcessLookupError:
      break
    if time.monotonic() > deadline:
      os.killpg(p.pid, signal.SIGKILL)
      raise AssertionError("processes still running after the launcher exited")
    time.sleep(0.05)
  # not communicate(): it reads the pipes' descriptors and would miss what readline() has buffered already
  err = err_lines[0] + p.stderr.read()
  assert "got SIGINT, forwarding SIGTERM" in err, err
  pids = [x for x in err.splitlines() if ": pid " in x]
  out = p.stdout.read()
  if len(pids) < 4:
    assert f"stopped by SIGINT after starting {len(pids)} of 4 processes" in err, err
  # exit 0 only when all four started and checkpointed (one stopped before its handler was set exits 143)
  assert (p.returncode == 0) == (out.count("checkpointed") == len(pids) == 4), (p.returncode, out, err)


@pytest.mark.parametrize("args, message", [
  (["0", "x"], "N must be a positive integer, got '0'"),
  (["2", "x", "--process-id", "1"], "--process-id is set by the launcher"),
  (["2", "x", "--local-devices", "many"], "--local-devices must be a positive integer"),
])
def test_launch_local_bad_arguments(tmp_path, args, message):
  p = _launch(tmp_path, *args)
  out, err = p.communicate(timeout=60)
  assert p.returncode == 2 and message in err, err


# ----------------------------------------------------------------------------------------------------------
# The TPU pod and SLURM launchers cannot run here; their dry runs show the exact commands
# ----------------------------------------------------------------------------------------------------------

ARGS = ["lm_moe_tiny", "model.moe.top_k=1", "data.dataset=it's spaced out", "--workdir", "/shared/runs/x"]


def _dry(script, *args, **env):
  e = dict(os.environ, MOEJAX_DRY_RUN="1", **env)
  return subprocess.run(["bash", str(ROOT / "scripts" / script), *args], env=e, capture_output=True, text=True,
                        timeout=60)


def _bash_words(line):
  """Split a line the way bash would (the dry runs print bash-quoted commands, $'...' included)."""
  out = subprocess.run(["bash", "-c", 'eval "set -- $1"; printf "%s\\0" "$@"', "_", line], capture_output=True,
                       text=True, check=True).stdout
  return out.split("\0")[:-1]


def _train_args(remote_cmd):
  words = shlex.split(remote_cmd)
  return words[words.index("train") + 1:]


def test_launch_tpu_pod_commands():
  p = _dry("launch_tpu_pod.sh", "my-pod", "us-west4-a", *ARGS, MOEJAX_REPO="https://example.com/moejax.git",
           MOEJAX_REF="0123abc", GCLOUD_FLAGS="--project p1 --internal-ip", MOEJAX_COMPILE_CHECK="0")
  assert p.returncode == 0, p.stderr
  setup, run = [_bash_words(x) for x in p.stdout.strip().splitlines()]
  for cmd in (setup, run):
    assert cmd[:9] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone", "us-west4-a",
                       "--worker=all"]
    assert cmd[9:12] == ["--project", "p1", "--internal-ip"] and cmd[12] == "--command" and len(cmd) == 14
  assert "git clone -q https://example.com/moejax.git" in setup[13] and "git checkout -q 0123abc" in setup[13]
  assert "pip install -q -e . 'jax[tpu]" in setup[13]
  subprocess.run(["bash", "-n", "-c", setup[13]], check=True)  # the remote scripts parse
  subprocess.run(["bash", "-n", "-c", run[13]], check=True)
  assert run[13].startswith("cd ~/moejax && ") and ".venv/bin/moejax train" in run[13]
  assert _train_args(run[13]) == [*ARGS, "--no-progress"]  # every argument arrives intact on the workers
  p = _dry("launch_tpu_pod.sh", "my-pod", "us-west4-a", *ARGS, MOEJAX_SETUP="0", MOEJAX_REPO="r", MOEJAX_REF="c",
           MOEJAX_COMPILE_CHECK="0")
  assert len(p.stdout.strip().splitlines()) == 1


def test_launch_tpu_pod_checks_the_fit_before_touching_the_pod():
  """The launcher compiles the step for the pod's topology here first (`moejax compile --require-fit`) and starts
  nothing when that fails: here the main environment has no libtpu, so the compile refuses with its own one-line
  reason and the launch is refused after it (tests/test_compile.py runs the same with libtpu: fits / does not
  fit). A dry run needs the topology named, since it cannot ask gcloud."""
  env = dict(MOEJAX_REPO="r", MOEJAX_REF="c", MOEJAX_COMPILE=f"{sys.executable} -m moejax.cli")
  p = _dry("launch_tpu_pod.sh", "my-pod", "us-west4-a", *ARGS, **env)
  assert p.returncode == 2 and "dry run without MOEJAX_TOPOLOGY" in p.stderr and not p.stdout
  p = _dry("launch_tpu_pod.sh", "my-pod", "us-west4-a", *ARGS, MOEJAX_TOPOLOGY="v5p:2x2x1", **env)
  assert p.returncode == 2 and not p.stdout, p.stdout  # no gcloud command was run or printed
  assert "needs libtpu" in p.stderr and "[tpu]" in p.stderr  # the compile's own one-line reason
  assert "not launching: lm_moe_tiny does not fit or does not compile for v5p:2x2x1" in p.stderr


def test_launch_tpu_pod_needs_a_shared_workdir():
  p = _dry("launch_tpu_pod.sh", "my-pod", "us-west4-a", "lm_moe_tiny", MOEJAX_REPO="r", MOEJAX_REF="c")
  assert p.returncode == 2 and "pass --workdir DIR on storage every worker sees" in p.stderr


def test_launch_slurm_command_and_header():
  p = _dry("launch_slurm.sbatch", *ARGS, SLURM_SUBMIT_DIR="/shared/moejax")
  assert p.returncode == 0, p.stderr
  assert shlex.split(p.stdout) == ["srun", "--kill-on-bad-exit=1", "--cpu-bind=none", "/shared/moejax/.venv/bin/moejax",
                                   "train", *ARGS, "--no-progress"]
  assert _dry("launch_slurm.sbatch", "lm_moe_tiny").returncode == 2
  # sbatch reads #SBATCH lines only before the first command
  lines = (ROOT / "scripts" / "launch_slurm.sbatch").read_text().splitlines()
  first_cmd = next(i for i, x in enumerate(lines) if x.strip() and not x.startswith("#"))
  sbatch = [i for i, x in enumerate(lines) if x.startswith("#SBATCH")]
  assert sbatch and max(sbatch) < first_cmd
  opts = dict((x.split()[1].lstrip("-").split("=", 1) + [""])[:2] for x in lines if x.startswith("#SBATCH"))
  assert opts["ntasks-per-node"] == "1" and opts["signal"] == "TERM@120" and "requeue" in opts


# ----------------------------------------------------------------------------------------------------------
# Preemption in one process (the multi-process version is below)
# ----------------------------------------------------------------------------------------------------------

_TINY_DENSE = ["model.d_model=32", "model.num_layers=1", "model.num_heads=2", "model.d_ff=64", "data.seq_len=32",
               "data.batch_size=8", "train.eval_steps=1", "optim.warmup_steps=2", "train.log_every=1",
               "train.eval_every=100", "train.checkpoint_every=4", "train.steps=8"]


def _params_np(state):
  return {k: np.asarray(v) for k, v in sharding.flatten(state["params"]).items()}


def test_sigterm_checkpoints_exits_cleanly_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
  cfg = registry.get("lm_dense_tiny", _TINY_DENSE)
  ref = train.train(cfg, tmp_path / "ref", progress=False)
  run = tmp_path / "run"
  # SIGTERM while building batch 3: during step 3, where no checkpoint is due.
  monkeypatch.setattr(step_lib, "global_batch", sigterm_at_call(step_lib.global_batch, 3))
  r = train.train(cfg, run, progress=False)
  assert (r["status"], r["step"]) == ("preempted", 3)
  assert json.loads((run / "result.json").read_text())["status"] == "preempted"
  assert checkpoint.Manager(run).all_steps() == [3]
  # Resumed at 3; SIGTERM during step 4, where the scheduled checkpoint (checkpoint_every=4) is also written.
  monkeypatch.setattr(step_lib, "global_batch", sigterm_at_call(step_lib.global_batch, 1))
  r = train.train(cfg, run, progress=False)
  assert (r["status"], r["step"]) == ("preempted", 4)
  assert checkpoint.Manager(run).all_steps() == [3, 4]
  assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the trainer put the old handler back
  monkeypatch.undo()
  rows = [x for x in metrics.read_jsonl(run) if x["split"] == "train"]
  assert [x["step"] for x in rows] == [1, 2, 3, 4]  # no step lost or repeated
  ref_rows = [x for x in metrics.read_jsonl(tmp_path / "ref") if x["split"] == "train"]
  assert [x["loss"] for x in rows] == [x["loss"] for x in ref_rows[:4]]
  # Twice interrupted and resumed == the uninterrupted run at the same step, bit for bit.
  s = train.setup(cfg)
  ref4 = checkpoint.Manager(tmp_path / "ref", async_save=False).restore_step(4, s.abstract_state)
  a, b = _params_np(ref4), _params_np(r["state"])
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  ref8 = _params_np(ref["state"])
  assert ref["step"] == 8 and any(not np.array_equal(a[k], ref8[k]) for k in a)  # training moves the params


# ----------------------------------------------------------------------------------------------------------
# Real processes on localhost (slow): expert parallelism across processes, preemption, a killed process
# ----------------------------------------------------------------------------------------------------------

TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64", "data.seq_len=32",
        "data.batch_size=8", "train.eval_steps=1", "optim.warmup_steps=2"]
STEPS = 60


def _moe_args():
  """The MoE twin (8 experts, every other layer), on a mesh whose expert axis (8) spans both processes (4 CPU
  devices each), so expert weights and the MoE layer's token exchange cross the process boundary."""
  name = ["lm_moe_tiny"] if "lm_moe_tiny" in registry.names() else \
    ["lm_dense_tiny", "model.moe.num_experts=8", "model.moe.every=2"]
  return [*name, *TINY, "mesh.data=1", "mesh.expert=8", "train.eval_every=100000",
          "train.checkpoint_every=100000", "train.log_every=1"]


def _launch_real(workdir, *extra, n=2, log_name="log.txt", **env):
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  log = workdir.parent / f"{workdir.name}.{log_name}"
  e = dict(os.environ, MOEJAX_BIN=f"{sys.executable} -m moejax.cli", **env)
  e.pop("XLA_FLAGS", None)  # the launcher gives each process its own device count
  with open(log, "w") as f:
    p = subprocess.Popen(["bash", str(LAUNCH), str(n), *_moe_args(), *extra, "--no-progress", "--workdir",
                          str(workdir)], env=e, stdout=f, stderr=subprocess.STDOUT, text=True, start_new_session=True)
  return p, log


def _pids(log, n=2, timeout=60):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    found = {}
    for line in log.read_text().splitlines():
      if line.startswith("launch_local: process ") and ": pid " in line:
        i, pid = line[len("launch_local: process "):].split(": pid ")
        found[int(i)] = int(pid)
    if len(found) == n:
      return found
    time.sleep(0.05)
  raise AssertionError(f"no pids in {log.read_text()}")


def _wait_step(workdir, step, p, log, timeout=600):
  """Until process 0 has logged a training step >= `step` (the loop, and its SIGTERM handler, is running)."""
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    rows = [r for r in metrics.read_jsonl(workdir) if r["split"] == "train"]
    if rows and rows[-1]["step"] >= step:
      return rows[-1]["step"]
    assert p.poll() is None, f"the run ended before step {step}:\n{log.read_text()}"
    time.sleep(0.02)
  raise AssertionError(f"no step {step} within {timeout}s:\n{log.read_text()}")


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
  """One uninterrupted 2-process run, shared by the equivalence and the preemption tests."""
  wd = tmp_path_factory.mktemp("two_process") / "ref"
  p, log = _launch_real(wd, f"train.steps={STEPS}")
  assert p.wait(timeout=900) == 0, log.read_text()
  return wd, log


@pytest.mark.slow
def test_two_processes_expert_parallel_match_one_process(two_process_run):
  wd, log = two_process_run
  text = log.read_text()
  assert "2 processes x 4 CPU devices" in text and "'expert': 8" in text, text
  cfg = checkpoint.read_config(wd)
  assert cfg.model.moe.num_experts == 8 and cfg.mesh.expert == 8
  rows = [r for r in metrics.read_jsonl(wd) if r["split"] == "train"]
  assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
  assert all(any(k.startswith("moe/") and k.endswith("/expert_load") for k in r) for r in rows)  # MoE ran
  # The same model, mesh shape and global batches in one process with 8 devices. Each process of the run read
  # its own shard of the data; here both shards are read and concatenated into the same global batch.
  s = train.setup(cfg, sharding.make_mesh(cfg.mesh))
  step_fn = train.make_train_step(s)
  state = train.init_state(s, jax.random.key(cfg.train.seed))
  its = [s.task.make_iterator(cfg, cfg.data.train_split, process_index=i, process_count=2,
                              seed=cfg.data.shuffle_seed, repeat=True) for i in range(2)]
  losses = []
  for _ in range(STEPS):
    local = [next(it) for it in its]
    batch = {k: np.concatenate([x[k] for x in local]) for k in local[0]}
    state, m = step_fn(state, step_lib.global_batch(batch, s))
    losses.append(float(m["loss"]))
  np.testing.assert_allclose([r["loss"] for r in rows], losses, rtol=1e-5)
  step, saved = checkpoint.Manager(wd, async_save=False).restore_latest(s.abstract_state)
  assert step == STEPS
  a, b = _params_np(saved), _params_np(state)
  assert a.keys() == b.keys() and any("expert" in k for k in a)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=1e-5, err_msg=k)


def _result(wd):
  return json.loads((pathlib.Path(wd) / "result.json").read_text())


def _checkpointed_by_every_process(wd, step, n=2):
  data = pathlib.Path(wd) / "checkpoints" / str(step) / "data"
  return sorted(f.name for f in data.glob("process_*.json")) == [f"process_{i}-of-{n}.json" for i in range(n)]


@pytest.mark.slow
def test_sigterm_to_one_or_all_processes_checkpoints_and_resumes(tmp_path, two_process_run):
  """SIGTERM to process 1 only (the per-step allgather makes both agree), resume, SIGTERM to the launcher
  (forwarded to all, as a scheduler does), resume to the end: the final params equal the uninterrupted run's."""
  ref_wd, _ = two_process_run
  wd = tmp_path / "run"
  args = [f"train.steps={STEPS}"]
  p, log = _launch_real(wd, *args, log_name="1.txt")
  pids = _pids(log)
  _wait_step(wd, 2, p, log)
  os.kill(pids[1], signal.SIGTERM)
  assert p.wait(timeout=300) == 0, log.read_text()
  r1 = _result(wd)
  k1 = r1["step"]
  assert r1["status"] == "preempted" and 2 <= k1 < STEPS, r1
  assert f"preempted: checkpointed step {k1}" in log.read_text()
  assert checkpoint.Manager(wd).all_steps() == [k1] and _checkpointed_by_every_process(wd, k1)

  p, log = _launch_real(wd, *args, log_name="2.txt")
  _wait_step(wd, k1 + 2, p, log)
  p.send_signal(signal.SIGTERM)  # the launcher forwards it to both processes
  assert p.wait(timeout=300) == 0, log.read_text()
  text = log.read_text()
  assert f"resuming at step {k1}" in text and "got SIGTERM, forwarding SIGTERM to all 2 processes" in text
  r2 = _result(wd)
  k2 = r2["step"]
  assert r2["status"] == "preempted" and k1 < k2 < STEPS, r2
  assert _checkpointed_by_every_process(wd, k2)

  p, log = _launch_real(wd, *args, log_name="3.txt")
  assert p.wait(timeout=600) == 0, log.read_text()
  assert f"resuming at step {k2}" in log.read_text()
  assert _result(wd)["status"] == "completed" and _result(wd)["step"] == STEPS
  rows = [r for r in metrics.read_jsonl(wd) if r["split"] == "train"]
  assert sorted({r["step"] for r in rows}) == list(range(1, STEPS + 1))
  cfg = checkpoint.read_config(wd)
  s = train.setup(cfg, sharding.make_mesh(cfg.mesh))
  a = checkpoint.Manager(ref_wd, async_save=False).restore_latest(s.abstract_state)
  b = checkpoint.Manager(wd, async_save=False).restore_latest(s.abstract_state)
  assert a[0] == b[0] == STEPS
  pa, pb = _params_np(a[1]), _params_np(b[1])
  for k in pa:
    np.testing.assert_array_equal(pa[k], pb[k], err_msg=k)


@pytest.mark.slow
@pytest.mark.parametrize("victim", [1, 0])
def test_killed_process_stops_the_other_with_a_clear_error(tmp_path, victim):
  heartbeat = 10
  wd = tmp_path / "run"
  p, log = _launch_real(wd, "train.steps=100000", MOEJAX_HEARTBEAT_S=str(heartbeat))
  pids = _pids(log)
  _wait_step(wd, 2, p, log)
  os.kill(pids[victim], signal.SIGKILL)
  t_kill = time.monotonic()
  rc = p.wait(timeout=300)
  waited = time.monotonic() - t_kill
  text = log.read_text()
  survivor = 1 - victim
  assert rc != 0, text
  assert f"process {survivor} still running" not in text, text  # it stopped by itself, not by the launcher
  assert f"p{victim}=137" in text, text
  assert waited < heartbeat + 30, (waited, text)
  lines = [x for x in text.splitlines() if x.startswith(f"[p{survivor}]")]
  if victim == 1:  # the survivor was blocked in a collective: the watchdog notices the silence
    assert f"p{survivor}={distributed.EXIT_LOST}" in text, text
    err = [x for x in lines if "moejax: error:" in x]
    assert err and "process 1 of 2 sent no heartbeat" in err[0] and "Re-run the same command" in err[0], text
  else:  # process 0 hosted the coordination service: JAX's runtime stops the survivor at once
    assert any("lost contact with the coordinator (process 0)" in x or "detected fatal errors" in x
               for x in lines), text


@pytest.mark.slow
def test_two_processes_upcycle_a_one_process_dense_run(tmp_path):
  """`init.upcycle_from` across processes: a dense run trained by one process is upcycled by a 2-process run
  whose expert axis spans both (each restores and upcycles only its shards), continuing the dense step. Its
  data position cannot carry over from one process to two, so the stream starts over, with a warning. The
  losses and final params equal one process replaying the same upcycled init and global batches."""
  dense = tmp_path / "dense"
  train.train(registry.get("lm_dense_tiny", TINY + ["train.steps=4", "train.checkpoint_every=4",
                                                    "train.eval_every=100000"]), dense, progress=False)
  wd = tmp_path / "moe"
  p, log = _launch_real(wd, f"init.upcycle_from={dense}", "init.continue_step=True", "train.steps=8")
  assert p.wait(timeout=900) == 0, log.read_text()
  text = log.read_text()
  assert "starting at step 4" in text and "the data pipeline starts from the beginning" in text, text
  rows = [r for r in metrics.read_jsonl(wd) if r["split"] == "train"]
  assert [r["step"] for r in rows] == [5, 6, 7, 8]
  cfg = checkpoint.read_config(wd)
  s = train.setup(cfg, sharding.make_mesh(cfg.mesh))
  step_fn = train.make_train_step(s)
  params, step0 = upcycle.from_checkpoint(cfg, s.mesh, s.specs)
  assert step0 == 4
  state = train.init_state(s, jax.random.key(cfg.train.seed), params, step0)
  its = [s.task.make_iterator(cfg, cfg.data.train_split, process_index=i, process_count=2,
                              seed=cfg.data.shuffle_seed, repeat=True) for i in range(2)]
  losses = []
  for _ in rows:
    local = [next(it) for it in its]
    state, m = step_fn(state, step_lib.global_batch({k: np.concatenate([x[k] for x in local]) for k in local[0]}, s))
    losses.append(float(m["loss"]))
  np.testing.assert_allclose([r["loss"] for r in rows], losses, rtol=1e-5)
  _, saved = checkpoint.Manager(wd, async_save=False).restore_latest(s.abstract_state)
  a, b = _params_np(saved), _params_np(state)
  assert any("experts" in k for k in a)
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=1e-5, err_msg=k)
