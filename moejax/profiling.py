"""`train.profile_steps=[N, M]`: a `jax.profiler` trace of training steps N..M into `<workdir>/profile`.

The trace (`plugins/profile/<time>/<host>.xplane.pb` and `.trace.json.gz`) opens in TensorBoard's profile plugin,
XProf or Perfetto (ui.perfetto.dev reads the .trace.json.gz). Steps before N (compilation, warm-up) stay out; the
trace stops after step M's results are ready, so its last step is whole. Only the main process traces.

  moejax train lm_moe_tiny train.steps=20 train.profile_steps=[10,12] --workdir runs/prof
"""

from __future__ import annotations

import pathlib
from typing import Any

import jax


class StepTrace:
  """Call `before(k)` before step k runs and `after(k, outputs)` once it has been dispatched; `close()` always."""

  def __init__(self, steps: tuple[int, ...], workdir: pathlib.Path, enabled: bool = True):
    self.first, self.last = steps if steps else (0, -1)
    self.dir = pathlib.Path(workdir) / "profile"
    self.enabled = enabled and bool(steps)
    self.active = False

  def before(self, k: int) -> None:
    if self.enabled and not self.active and self.first <= k <= self.last:
      self.dir.mkdir(parents=True, exist_ok=True)
      jax.profiler.start_trace(str(self.dir))
      self.active = True

  def after(self, k: int, outputs: Any) -> None:
    if self.active and k >= self.last:
      jax.block_until_ready(outputs)
      self.close()
      self.enabled = False

  def close(self) -> None:
    if self.active:
      jax.profiler.stop_trace()
      self.active = False
