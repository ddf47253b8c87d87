"""How a run trains: the device mesh, the optimizer and its schedule, the training loop."""

from __future__ import annotations

import dataclasses

from moejax.config.base import check


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh `data x fsdp x expert x tensor`; one size may be -1 (takes the remaining devices)."""

  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = self.shape()
    check(sum(s == -1 for s in sizes) <= 1, f"mesh: at most one axis may be -1, got {self}")
    check(all(s == -1 or s >= 1 for s in sizes), f"mesh: sizes must be >= 1 or -1, got {self}")

  def shape(self) -> tuple[int, int, int, int]:
    return (self.data, self.fsdp, self.expert, self.tensor)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup then cosine (or constant) decay, global-norm clipping, optional param groups."""

  lr: float = 3e-3
  warmup_steps: int = 20
  schedule: str = "cosine"  # cosine | constant | linear
  min_lr_ratio: float = 0.1
  # The step the decay starts at (constant LR from the warmup's end until then; 0 = right after the warmup): a
  # warmup-stable-decay schedule, so a run can branch off another's constant phase and decay over its own length.
  decay_start: int = 0
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0  # 0 disables
  grad_accum: int = 1
  # Param groups by regex over param paths (e.g. "layers/\\d+/moe/router/.*"): frozen, or an lr multiplier.
  freeze: tuple[str, ...] = ()
  lr_multipliers: tuple[tuple[str, float], ...] = ()

  def __post_init__(self):
    check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
    check(self.schedule in ("cosine", "constant", "linear"), f"optim.schedule={self.schedule!r} unknown")
    check(self.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {self.grad_accum}")
    check(self.warmup_steps >= 0 and 0 <= self.min_lr_ratio <= 1, "optim.warmup_steps >= 0, 0 <= min_lr_ratio <= 1")
    check(self.decay_start >= 0, f"optim.decay_start must be >= 0, got {self.decay_start}")
    check(self.weight_decay >= 0 and self.clip_norm >= 0,
          f"optim.weight_decay={self.weight_decay} and optim.clip_norm={self.clip_norm} must be >= 0")
    check(0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps > 0,
          f"optim: need 0 <= b1 < 1, 0 <= b2 < 1 and eps > 0, got b1={self.b1}, b2={self.b2}, eps={self.eps}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 300  # the last step (absolute: a run upcycled with init.continue_step starts past 0)
  eval_every: int = 100
  eval_steps: int = 8
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  log_every: int = 10
  seed: int = 0
  # The LR schedule's clock: total steps it decays over (0 -> train.steps). Upcycled runs that continue
  # a dense schedule set `schedule_offset` to the dense run's step.
  schedule_steps: int = 0
  nan_guard: bool = True
  # The NaN guard stops the run after this many consecutive skipped (non-finite) steps, counted on device every
  # step whatever log_every is.
  max_consecutive_skips: int = 20
  # (N, M): a jax.profiler trace of steps N..M (1-based, inclusive) into <workdir>/profile (TensorBoard / XProf /
  # Perfetto read it). () = no trace.
  profile_steps: tuple[int, ...] = ()

  def __post_init__(self):
    check(self.steps >= 0, f"train.steps must be >= 0, got {self.steps}")
    check(not self.profile_steps or (len(self.profile_steps) == 2 and 1 <= self.profile_steps[0] <= self.profile_steps[1]),
          f"train.profile_steps={list(self.profile_steps)}: give [N, M] with 1 <= N <= M (trace steps N..M), or []")
    check(self.schedule_steps >= 0, f"train.schedule_steps must be >= 0, got {self.schedule_steps}")
    for f in ("eval_every", "eval_steps", "checkpoint_every", "log_every", "keep_checkpoints", "max_consecutive_skips"):
      check(getattr(self, f) >= 1, f"train.{f} must be >= 1, got {getattr(self, f)}")
