"""Where a stored result came from: the code (commit, uncommitted changes), the machine (CPU model, AVX-512,
cores, load) and the versions (Python, jax, jaxlib), one dict for every file under results/."""

from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import re
import subprocess


def cpu() -> dict:
  """The CPU model, whether it has AVX-512 (XLA:CPU's numerics differ with and without it), an
  `--xla_cpu_max_isa` cap in XLA_FLAGS, and the core count."""
  model, flags = "", ""
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name") and not model:
        model = line.split(":", 1)[1].strip()
      if line.startswith("flags") and not flags:
        flags = line
  except OSError:
    pass
  max_isa = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
  return {"cpu": model or platform.processor(), "cpu_has_avx512": "avx512f" in flags,
          "xla_cpu_max_isa": max_isa.group(1) if max_isa else None, "cores": os.cpu_count()}


def commit(root: pathlib.Path) -> str:
  """`root`'s HEAD, with "+uncommitted" when the package or the experiments differ from it ("" outside git)."""
  def git(*args: str) -> str:
    try:
      return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
      return ""

  head = git("rev-parse", "HEAD")
  dirty = git("status", "--porcelain", "moejax", "experiments")
  return head + ("+uncommitted" if head and dirty else "")


def record(root: pathlib.Path) -> dict:
  """Date, commit, CPU, load average (1 min), the host allocator (`moejax/hostmem.py`) and versions, now."""
  import jax
  import jaxlib

  from moejax import hostmem

  return {"date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "commit": commit(root),
          **cpu(), "load_avg_1m": round(os.getloadavg()[0], 2),
          "host_malloc": hostmem.state(), "python": platform.python_version(),
          "jax": jax.__version__, "jaxlib": jaxlib.__version__}


def finished(started: dict, **more) -> dict:
  """A run's provenance at its end: `record()` taken when it started, the load average now
  (`load_avg_1m_at_end`), and `more` (a command, wall time, ...)."""
  return {**started, "load_avg_1m_at_end": round(os.getloadavg()[0], 2), **more}


def write_json(path: str | pathlib.Path, started: dict, command: str, **fields) -> None:
  """A bench's `--json` file: its rows and parameters (`fields`) and `finished(started, command=command)`, so that
  `scripts/bench_results.py` can draw the docs' table from it with the machine, load and versions beside it."""
  pathlib.Path(path).write_text(json.dumps({**fields, "provenance": finished(started, command=command)}, indent=1))
