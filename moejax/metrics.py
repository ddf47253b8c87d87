"""Metrics out: JSONL (the source of truth for `moejax report`), TensorBoard events, and a progress bar with
throughput and MFU. Only process 0 writes; other processes get a no-op writer.

MFU = achieved model FLOPs/s / peak FLOPs/s of the devices in use. Peaks come from a table of accelerators
(dense bf16); on CPU there is no datasheet figure, so the peak is a float32 matmul measured once on this host
(and the figure is labelled `mfu_cpu_est`-style in docs: treat it as relative, not absolute).
"""

from __future__ import annotations

import json
import math
import pathlib
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Dense bf16 peak FLOP/s per device (datasheets).
PEAK_FLOPS = {
  "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v6 lite": 918e12,
  "NVIDIA H100": 989e12, "NVIDIA H200": 989e12, "NVIDIA A100": 312e12, "NVIDIA B200": 2250e12,
}

_CPU_PEAK: float | None = None


def _cpu_peak() -> float:
  """Measured float32 matmul FLOP/s of this host (all cores): the honest denominator on CPU."""
  global _CPU_PEAK
  if _CPU_PEAK is None:
    n = 1024
    dev = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), dev)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = math.inf
    for _ in range(5):
      t = time.perf_counter()
      f(a).block_until_ready()
      best = min(best, time.perf_counter() - t)
    _CPU_PEAK = 2 * n**3 / best
  return _CPU_PEAK


def peak_flops(devices: list[jax.Device] | None = None) -> float:
  devices = devices or jax.devices()
  kind = devices[0].device_kind
  for name, peak in PEAK_FLOPS.items():
    if kind.startswith(name) or name in kind:
      return peak * len(devices)
  if devices[0].platform == "cpu":
    return _cpu_peak()  # fake CPU devices share the same cores: the host peak is the total
  return float("nan")


def _jsonable(v: Any) -> Any:
  if isinstance(v, (jax.Array, np.ndarray, np.generic)):
    a = np.asarray(v)
    return a.item() if a.ndim == 0 else a.tolist()
  return v


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in metrics.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict):
      out.update(flatten_metrics(v, key + "/"))
    else:
      out[key] = _jsonable(v)
  return out


SUPERSEDED = "metrics.superseded.jsonl"


def supersede_after(workdir: str | pathlib.Path, step: int) -> int:
  """Move the rows of `workdir`'s metrics.jsonl past `step` (the step training now starts from) to the end of
  metrics.superseded.jsonl, so the history stays one line per step: rows a killed run wrote after its last
  checkpoint, or the rows of an earlier run in a directory that has no checkpoint left. Nothing is deleted (the
  moved rows keep their order and time stamps), and metrics.jsonl is replaced in one rename. Returns how many
  rows moved."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return 0
  keep, moved = [], []
  for line in path.read_text().splitlines():
    if not line.strip():
      continue
    try:
      later = int(json.loads(line)["step"]) > step
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
      later = True  # a line cut by a kill mid-write (or not a row): set aside with the rows after it
    (moved if later else keep).append(line)
  if not moved:
    return 0
  with open(path.parent / SUPERSEDED, "a") as f:
    f.write("".join(line + "\n" for line in moved))
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(line + "\n" for line in keep))
  tmp.replace(path)
  return len(moved)


class Writer:
  """Appends rows to `workdir`/metrics.jsonl (and TensorBoard events). With `start_step`, rows already there past
  that step are first set aside (`supersede_after`) and their count kept in `superseded`."""

  def __init__(self, workdir: str | pathlib.Path, enabled: bool = True, tensorboard: bool = True,
               start_step: int | None = None):
    self.enabled = enabled
    self.path = pathlib.Path(workdir) / "metrics.jsonl"
    self._tb = None
    self.superseded = 0
    if enabled:
      self.path.parent.mkdir(parents=True, exist_ok=True)
      if start_step is not None:
        self.superseded = supersede_after(workdir, start_step)
      self._f = open(self.path, "a")
      if tensorboard:
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(pathlib.Path(workdir) / "tb"))

  def write(self, step: int, split: str, metrics: dict) -> dict[str, Any]:
    flat = flatten_metrics(metrics)
    if not self.enabled:
      return flat
    self._f.write(json.dumps({"step": int(step), "split": split, "time": time.time(), **flat}) + "\n")
    self._f.flush()
    if self._tb is not None:
      for k, v in flat.items():
        if isinstance(v, (int, float)) and math.isfinite(v):
          self._tb.add_scalar(f"{split}/{k}", v, step)
      self._tb.flush()
    return flat

  def close(self) -> None:
    if self.enabled:
      self._f.close()
      if self._tb is not None:
        self._tb.close()


def read_jsonl(workdir: str | pathlib.Path) -> list[dict[str, Any]]:
  path = pathlib.Path(workdir) / "metrics.jsonl"
  if not path.exists():
    return []
  rows = []
  for line in path.read_text().splitlines():
    if line.strip():
      try:
        rows.append(json.loads(line))
      except json.JSONDecodeError:
        pass  # a line cut by a kill mid-write; the rest of the file is good
  return rows


class Progress:
  """A tqdm bar: step, loss, units/s (tokens or images) and MFU. Silent on processes other than 0."""

  def __init__(self, total: int, initial: int, unit: str, enabled: bool = True, bar: bool = True):
    self.enabled = enabled
    self.unit = unit
    self._bar = None
    if enabled and bar:
      from tqdm import tqdm

      self._bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                       mininterval=1.0, smoothing=0.1)

  def set_step(self, step: int, **postfix: Any) -> None:
    if self._bar is not None:
      self._bar.set_postfix(postfix, refresh=False)
      self._bar.update(step - self._bar.n)

  def write(self, text: str) -> None:
    """A line above the bar (or a plain line with the bar off: logs, CI)."""
    if self._bar is not None:
      self._bar.write(text, file=sys.stderr)
    elif self.enabled:
      print(text, file=sys.stderr, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
