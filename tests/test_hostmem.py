"""The opt-in host allocator of a CPU run (`moejax/hostmem.py`): with MOEJAX_HOST_MALLOC=1 the console command
re-executes itself once with the glibc settings, and with them a jitted program's big buffers stop page-faulting
on every call."""

import json
import os
import subprocess
import sys

import pytest

from moejax import hostmem

# A jitted program whose output (66 MiB, the M-fg expert buffer's size) is over glibc's largest mmap threshold,
# called 40 times; prints the minor page faults of each call.
FAULTS = """
import json, resource, jax, jax.numpy as jnp
x = jnp.ones((33760, 512)); f = jax.jit(lambda x: x * 2.0)
out = []
for _ in range(40):
  n0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  y = f(x); jax.block_until_ready(y); del y
  out.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - n0)
print(json.dumps(out))
"""

PAGES = 33760 * 512 * 4 // 4096  # 4 KiB pages in the buffer


def _env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items() if k not in hostmem.SETTINGS and k != hostmem.SWITCH}
  return {**env, **extra}


def _faults(env: dict) -> list[int]:
  out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, timeout=300,
                       check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


needs_glibc = pytest.mark.skipif(not hostmem.wanted(_env(**{hostmem.SWITCH: "1"})),
                                 reason="not Linux/glibc, or an accelerator plugin is installed")


@needs_glibc
def test_with_the_settings_big_buffers_stop_faulting_once_the_heap_settles():
  # glibc's defaults: every call maps the buffer afresh and faults it in (fewer faults with transparent huge
  # pages set to "always": then this comparison says nothing, and the assertion on the default is skipped).
  default = _faults(_env())
  heap = _faults(_env(**hostmem.SETTINGS))
  faulting = lambda calls: sum(n > PAGES // 2 for n in calls[10:])
  if sum(default[10:]) > 10 * PAGES:
    assert faulting(default) == 30, default
  # With them the heap grows for the first calls (an aligned block does not fit the one just freed until freed
  # neighbours merge), then the freed blocks are reused: most calls fault nothing.
  assert faulting(heap) < 15, heap
  assert sum(n == 0 for n in heap[10:]) >= 15, heap


@needs_glibc
def test_the_console_command_reexecutes_once_with_the_settings_and_the_same_arguments():
  probe = ("import json, os, sys; from moejax import hostmem; hostmem.reexec(); "
           "print(json.dumps({'pid': os.getpid(), 'argv': sys.argv[1:], "
           "'env': {k: os.environ.get(k) for k in hostmem.SETTINGS}, 'state': hostmem.state()}))")
  p = subprocess.Popen([sys.executable, "-c", probe, "a", "b c"], env=_env(**{hostmem.SWITCH: "1"}),
                       stdout=subprocess.PIPE, text=True)
  out, _ = p.communicate(timeout=120)
  lines = out.strip().splitlines()
  assert len(lines) == 1  # ran once, after the re-exec
  rec = json.loads(lines[0])
  assert rec["pid"] == p.pid and rec["argv"] == ["a", "b c"] and rec["state"] == "heap"
  assert rec["env"] == hostmem.SETTINGS


def test_it_is_off_unless_asked_and_keeps_the_users_own_values():
  assert not hostmem.wanted({}) and not hostmem.wanted({hostmem.SWITCH: "0"})
  assert hostmem.state({}) == "default" and hostmem.state(dict(hostmem.SETTINGS)) == "heap"
  probe = "import os; from moejax import hostmem; hostmem.reexec(); print(os.environ.get('MALLOC_ARENA_MAX'))"
  run = lambda env: subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                                   timeout=120, check=True).stdout.strip()
  assert run(_env()) == "None"
  assert run(_env(**{hostmem.SWITCH: "0"})) == "None"
  assert run(_env(**{hostmem.SWITCH: "1", "MALLOC_ARENA_MAX": "4"})) == "4"
