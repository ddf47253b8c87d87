"""Hyper-parameter grids the studies extend past their ends: a choice that sits on the edge of what was tried is
not a choice until the next value beyond it has been tried too (peft_study's learning rates, ttmm_study's TTT
steps and learning rate)."""

from __future__ import annotations

import math

EXTEND = 2  # values added beyond each end of a grid, one at a time, while the choice sits on that end


def next_rate(lr: float, up: bool) -> float:
  """The neighbour of `lr` on the 1-3-10 ladder the grids use: 1e-2 -> 3e-2 -> 1e-1 up, 1e-2 -> 3e-3 down."""
  e = math.floor(math.log10(lr) + 1e-9)
  m = round(lr / 10 ** e)
  if up:
    return float(f"{3 * 10 ** e if m < 3 else 10 ** (e + 1):.0e}")
  return float(f"{3 * 10 ** (e - 1) if m < 3 else 10 ** e:.0e}")


def best(scores: dict[tuple[int, float], float]) -> tuple[int, float]:
  """The best (steps, lr) of a 2-D dev grid: the lowest score; ties: fewer steps, then the smaller rate."""
  return min(scores, key=lambda k: (scores[k], k))


def next_to_run(scores: dict[tuple[int, float], float], steps: tuple[int, ...], lrs: tuple[float, ...]
                ) -> tuple[int, float] | None:
  """The next dev point a study runs: the base grid `steps` x `lrs` first (steps-major), then `next_point`'s
  extension; None when the choice (`best`) is final."""
  missing = [(n, lr) for n in steps for lr in lrs if (n, lr) not in scores]
  return missing[0] if missing else next_point(scores, steps, lrs)


def next_point(scores: dict[tuple[int, float], float], steps: tuple[int, ...], lrs: tuple[float, ...]
               ) -> tuple[int, float] | None:
  """The next (steps, lr) to try on a 2-D dev grid whose best point so far (the lowest score; ties: fewer steps,
  then the smaller rate) sits on an end of what was tried in either coordinate: the steps doubled or halved, the
  rate one rung up or down the 1-3-10 ladder, at most EXTEND values beyond each end of the base grid
  (`steps` x `lrs`). A coordinate given one value is held fixed. None when the best point is interior, or every
  end that holds it is exhausted."""
  n, lr = best(scores)
  ns, ls = sorted({k[0] for k in scores}), sorted({k[1] for k in scores})
  out = []
  if len(steps) > 1:
    if n == ns[-1] and sum(v > max(steps) for v in ns) < EXTEND:
      out.append((2 * n, lr))
    if n == ns[0] and sum(v < min(steps) for v in ns) < EXTEND and n >= 2:
      out.append((n // 2, lr))
  if len(lrs) > 1:
    if lr == ls[-1] and sum(v > max(lrs) for v in ls) < EXTEND:
      out.append((n, next_rate(lr, up=True)))
    if lr == ls[0] and sum(v < min(lrs) for v in ls) < EXTEND:
      out.append((n, next_rate(lr, up=False)))
  return next((p for p in out if p not in scores), None)
