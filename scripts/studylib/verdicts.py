"""The papers' claims about upcycling, one verdict per claim, regime (young parent: 300 steps; mature parent: a
constant-LR parent of thousands) and budget, computed from the finished runs (the final eval loss without aux
losses, paired by seed: same parent, same data order).

The rule, fixed before the runs: Δ = arm - reference (negative: the arm is better). With at least three seeds,
|mean Δ| >= 3 standard errors decides it (the claim reproduces when the arm is better, is contradicted when it is
worse); under 3 SE the effect is unresolved and five seeds are asked for; at five seeds still under 3 SE it is "no
resolved difference". Fewer than three finished pairs: pending. A claim about growth compares the largest budget's
Δ with the smallest's, paired by seed (Δ_large - Δ_small < 0: the advantage grows).
"""

from __future__ import annotations

import dataclasses

from studylib.plan import Run, default_seeds, finished, select
from studylib.records import run_key
from studylib.tables import curve, mean_se, pm


@dataclasses.dataclass(frozen=True)
class Claim:
  text: str
  studies: tuple[str, str]  # (young-parent study, mature-parent study); "" where a regime has no such arm
  arm: str
  reference: str
  grows: bool = False  # the claim is that the advantage grows with the budget


CLAIMS = (
  Claim("The upcycled LM beats the dense continuation at equal steps (Komatsuzaki et al. 2023)",
        ("lm_upcycle", "lm_mature"), "upcycled", "dense_continued"),
  Claim("The upcycled LM beats the dense continuation at equal training FLOPs (Komatsuzaki et al. 2023)",
        ("lm_upcycle", "lm_mature"), "upcycled", "dense_flops"),
  Claim("The upcycled LM's advantage grows with the extra budget (Komatsuzaki et al. 2023)",
        ("lm_upcycle", "lm_mature"), "upcycled", "dense_continued", grows=True),
  Claim("CLIP-UP beats the dense CLIP at equal steps (Wang et al. 2025)",
        ("clip_up", "clip_mature"), "clip_up", "dense_continued"),
  Claim("CLIP-UP beats the dense CLIP at equal training FLOPs (Wang et al. 2025)",
        ("clip_up", "clip_mature"), "clip_up", "dense_flops"),
  Claim("CLIP-UP beats the same sparse model trained from scratch on the same FLOPs (Wang et al. 2025)",
        ("clip_up", "clip_mature"), "clip_up", "sparse_flops"),
  Claim("Sparse beats dense at equal active FLOPs (from scratch, same steps)",
        ("clip_up", ""), "sparse_scratch", "dense_active"),
)
DECIDED_SE = 3.0
MORE_SEEDS = 5


def outcome(deltas: list[float]) -> str:
  """The rule's answer: "pending", "reproduces", "contradicted", "unresolved" (more seeds asked for) or "no
  difference" (still under 3 SE at MORE_SEEDS)."""
  n = len(deltas)
  if n < 3:
    return "pending"
  m, se = mean_se(deltas)
  if abs(m) >= DECIDED_SE * se:
    return "reproduces" if m < 0 else "contradicted"
  return "unresolved" if n < MORE_SEEDS else "no difference"


def verdict(deltas: list[float]) -> str:
  n = len(deltas)
  return {"pending": f"pending ({n} of 3 seeds)", "reproduces": "**reproduces**",
          "contradicted": "**contradicted** (the reverse holds)",
          "unresolved": f"unresolved at {n} seeds (|Δ| < {DECIDED_SE:g} SE): run {MORE_SEEDS}",
          "no difference": f"no resolved difference at {n} seeds"}[outcome(deltas)]


def _finals(runs: list[Run]) -> dict[tuple[int, str, int], float]:
  return {(r.budget, r.arm, r.seed): float(curve(r)[1][-1]) for r in finished(runs)}


def _paired(f: dict, c: Claim, seeds: list[int], b: int) -> dict[int, float]:
  """Seed -> the claim's Δ at budget `b`, for the seeds where both runs finished."""
  return {s: f[b, c.arm, s] - f[b, c.reference, s] for s in seeds if (b, c.arm, s) in f and (b, c.reference, s) in f}


def command(study: str, budgets: list[int], arms: tuple[str, ...], seeds: list[int]) -> str:
  """The command that trains (or, where finished, skips) the runs behind one verdict row."""
  extra = "" if seeds == default_seeds(study) else f" --seeds {' '.join(map(str, seeds))}"
  return f"`scripts/studies.sh {study} --budgets {' '.join(map(str, budgets))} --arms {' '.join(arms)}{extra}`"


def cpu_hours(runs: list[Run], budgets: list[int], arms: tuple[str, str], seeds: list[int],
              timings: dict[str, dict]) -> float:
  """The recorded CPU time of the runs one verdict row reads: both arms at its budgets for its seeds, and the
  parents they start from (a mature parent shared by every budget is counted in each row that needs it)."""
  mine = [r for r in runs if r.seed in seeds and r.budget in (0, *budgets)]
  return sum(timings.get(run_key(r), {}).get("cpu_s", 0.0) for r in select(mine, list(arms))) / 3600


@dataclasses.dataclass(frozen=True)
class Row:
  """One verdict row before it is printed: the claim, its regime and study, the budgets it reads (one, or the
  smallest and largest for a growth claim) and the paired Δ per seed."""
  claim: Claim
  regime: str
  study: str
  budget: str
  budgets: list[int]
  paired: dict[int, float]
  what: str


def claim_rows(plans: dict[str, list[Run]]) -> list[Row]:
  finals = {study: _finals(runs) for study, runs in plans.items()}
  out = []
  for c in CLAIMS:
    for regime, study in zip(("young parent (300 steps)", "mature parent"), c.studies):
      if not study or study not in plans:
        continue
      f = finals[study]
      budgets = sorted({b for (b, _, _) in f if b > 0} | {r.budget for r in plans[study] if r.budget > 0})
      seeds = sorted({r.seed for r in plans[study]})

      if c.grows:
        lo, hi = _paired(f, c, seeds, budgets[0]), _paired(f, c, seeds, budgets[-1])
        paired = {s: hi[s] - lo[s] for s in sorted(lo.keys() & hi.keys())}
        shown = [(f"+{budgets[0]} -> +{budgets[-1]}", [budgets[0], budgets[-1]], paired, "Δ(large) - Δ(small)")]
      else:
        shown = [(f"+{b}", [b], _paired(f, c, seeds, b), f"{c.arm} - {c.reference}") for b in budgets]
      out += [Row(c, regime, study, budget, bs, paired, what) for budget, bs, paired, what in shown]
  return out


def rows(plans: dict[str, list[Run]], timings: dict[str, dict[str, dict]] | None = None,
         computed: list[Row] | None = None) -> list[dict]:
  """`plans`: study name -> its runs (restored from the record); `timings`: study name -> its recorded timings by
  `run_key`; `computed`: `claim_rows(plans)` where the caller has it already. One row per claim x regime x
  budget, with the command that trains its runs and their recorded CPU-hours."""
  timings = timings or {}
  out = []
  for r in claim_rows(plans) if computed is None else computed:
    d, arms = list(r.paired.values()), (r.claim.arm, r.claim.reference)
    used = sorted(r.paired) if len(d) >= 3 else sorted(set(r.paired) | set(default_seeds(r.study)))  # to finish it
    cost = cpu_hours(plans[r.study], r.budgets, arms, sorted(r.paired), timings.get(r.study, {})) if d else None
    out.append({"claim": r.claim.text, "regime": r.regime, "budget": r.budget, "Δ eval loss": r.what,
                "seeds": len(d), "mean ± SE": pm(*mean_se(d), 3) if d else "n/a", "verdict": verdict(d),
                "regenerate": command(r.study, r.budgets, arms, used),
                "CPU-hours (recorded)": "n/a" if cost is None else f"{cost:.2f}"})
  return out


def more_seeds(plans: dict[str, list[Run]], timings: dict[str, dict[str, dict]] | None = None,
               computed: list[Row] | None = None) -> list[dict]:
  """What the unresolved rows ask for: per study, one command per set of arms (the budgets that need the same
  arms share it) that trains seeds up to MORE_SEEDS of exactly those arms (finished runs are skipped), and its cost
  estimated from the recorded runs: each run of the command at the mean CPU time of its finished seeds, times the
  seeds to add (a parent shared by several budgets is priced once per study); ">=" where some run has no finished
  seed to price it. `computed` as for `rows`."""
  timings = timings or {}
  need: dict[str, tuple[dict[int, list[str]], list[Row]]] = {}
  for r in claim_rows(plans) if computed is None else computed:
    if outcome(list(r.paired.values())) != "unresolved":
      continue
    arms_at, rs = need.setdefault(r.study, ({}, []))
    for b in r.budgets:
      arms_at.setdefault(b, []).extend(a for a in (r.claim.arm, r.claim.reference) if a not in arms_at.get(b, []))
    rs.append(r)
  out = []
  for study, (arms_at, rs) in need.items():
    have = sorted(set.intersection(*(set(r.paired) for r in rs)))  # seeds every unresolved row has
    add = [s for s in range(2 * MORE_SEEDS) if s not in have][:MORE_SEEDS - len(have)]  # the lowest seeds missing
    done = {run_key(r) for r in finished(plans[study])}
    order = list(dict.fromkeys(r.arm for r in plans[study]))  # arms in plan order: one spelling per set
    groups: dict[tuple[str, ...], list[int]] = {}
    for b in sorted(arms_at):
      groups.setdefault(tuple(sorted(arms_at[b], key=order.index)), []).append(b)
    priced: set[tuple[int, str]] = set()
    for arms, budgets in groups.items():
      cpu: dict[tuple[int, str], list[float]] = {}
      for r in select([r for r in plans[study] if r.budget in (0, *budgets)], list(arms)):
        if (r.budget, r.arm) not in priced:
          t = timings.get(study, {}).get(run_key(r))
          cpu.setdefault((r.budget, r.arm), []).extend([t["cpu_s"]] if t and run_key(r) in done else [])
      priced |= set(cpu)
      per_seed = sum(sum(v) / len(v) for v in cpu.values() if v) / 3600
      out.append({"study": study, "seeds so far": len(have), "train": command(study, budgets, arms, add),
                  "CPU-hours (estimated)": f"{'>= ' * any(not v for v in cpu.values())}{per_seed * len(add):.1f}"})
  return out
