"""The host allocator of a CPU run: keep freed step buffers for the next step instead of faulting them in again.

XLA:CPU allocates a program's buffers on every call and frees them at its end. glibc serves any block larger
than its mmap threshold (at most 32 MiB on 64-bit) with a fresh `mmap` and unmaps it on free, so each call
page-faults its big buffers in again, 4 KiB at a time: ~17,000 minor faults and ~25-30 ms per 66 MiB buffer
on our 2-core machine, a third of the M-fg MoE layer's forward+backward (its [33760, 512] expert buffers). XLA
runs a program on worker threads, whose glibc arenas are 64 MiB heaps that hand larger blocks to `mmap` whatever
the settings, so all three of these are needed: one arena (the main heap, which can grow), no mmap, no trim.
Freed blocks then stay in the heap and the next call reuses them with no fault
(`tests/test_hostmem.py` counts the faults; `docs/benchmarks.md` has the layer timings with and without).

glibc reads these settings once, when the process starts (`mallopt` later does not reach the arena limit; the
in-process thresholds `moejax bench upcycle` raises help its upcycling program, not a program like the MoE
layer's whose big buffers come from a worker thread's arena: measured with `tests/test_hostmem.py`'s probe), so
the console entry point re-executes itself once with them in its environment (`reexec`), when asked to with
`MOEJAX_HOST_MALLOC=1`, on Linux with glibc and no accelerator plugin installed (a GPU or TPU host keeps its
large host copies off the heap and its many threads on their own arenas). Settings the user has made are kept.

It is opt-in because of its price: a process never returns its peak heap before it exits, and an aligned
block does not fit exactly into the one the previous call freed, so the heap grows for the first ten to thirty
calls until freed neighbours merge (a program of one 66 MiB buffer settles at about three times the resident
memory it has without the settings). Worth it for long CPU runs with big buffers and memory to spare.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import sys

# glibc's environment names (the trailing underscore is glibc's own spelling for these three).
SETTINGS = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}
SWITCH = "MOEJAX_HOST_MALLOC"
ACCELERATOR_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin", "jax_rocm7_plugin", "libtpu")


def wanted(env: dict | None = None) -> bool:
  """Whether this process should run with SETTINGS: asked for (MOEJAX_HOST_MALLOC=1), glibc on Linux, no
  accelerator plugin."""
  env = os.environ if env is None else env
  if env.get(SWITCH, "0") != "1" or sys.platform != "linux" or platform.libc_ver()[0] != "glibc":
    return False
  return not any(importlib.util.find_spec(name) is not None for name in ACCELERATOR_PLUGINS)


def state(env: dict | None = None) -> str:
  """For provenance: "heap" when this process runs with every setting, else "default"."""
  env = os.environ if env is None else env
  return "heap" if all(k in env for k in SETTINGS) else "default"


def reexec() -> None:
  """Re-execute this process (same pid, same arguments) with SETTINGS in its environment, once, when `wanted`;
  else return. Settings already in the environment (the user's, or this function's on the second start) win."""
  if not wanted() or all(k in os.environ for k in SETTINGS):
    return
  env = {**SETTINGS, **os.environ}
  argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)
  except OSError:  # cannot re-execute (an unusual interpreter): run as is
    return
