"""A study's runs: each arm x budget x seed as a `moejax train` command, the runs they start from, and which are
finished (a run is finished when its metrics reach its last step)."""

from __future__ import annotations

import dataclasses
import pathlib

from moejax import metrics

PRETRAIN = 300


MATURE_PARENT = 3000  # lm_mature's default parent length (--parent-steps)
BUDGETS = {"clip_up": [300, 1500], "lm_upcycle": [300, 1500, 3000], "lm_mature": [1500, 3000],
           "clip_mature": [1500], "capacity": [300]}


def default_seeds(study: str) -> list[int]:
  return [0] if study == "capacity" else [0, 1, 2]


CAPACITY_FACTORS = (1.0, 1.5, 2.0)


# --partial: runs still in progress are drawn and tabulated too, every curve cut at the last eval step all of
# them reached (a pilot's view; the table's "steps" column says where).
STEP_CAP: list[int] = []


@dataclasses.dataclass(frozen=True)
class Run:
  arm: str
  budget: int
  seed: int
  experiment: str
  steps: int
  workdir: pathlib.Path
  overrides: tuple[str, ...] = ()
  copy_from: pathlib.Path | None = None  # resumed from a copy of this (finished) run's directory
  start: int = PRETRAIN  # the parent's last step, where the arms branch off


def _seed(s: int) -> tuple[str, ...]:
  return (f"train.seed={s}", f"data.shuffle_seed={s}", f"init.seed={s}")


def flops_ratio(dense: str, sparse: str) -> float:
  """Training FLOPs per step of experiment `sparse` over those of `dense` (the routed top-k counted)."""
  from moejax import registry, tasks

  def per_step(name: str) -> float:
    cfg = registry.get(name)
    return cfg.data.batch_size * tasks.get(cfg.task).flops_per_example(cfg)

  return per_step(sparse) / per_step(dense)


def matched_steps(budget: int, dense: str, sparse: str) -> int:
  """The dense steps that cost what `budget` steps of `sparse` cost: the FLOP-matched dense arm's extra steps."""
  return round(budget * flops_ratio(dense, sparse))


def scratch_steps(parent_steps: int, budget: int, dense: str, sparse: str) -> int:
  """Steps of `sparse` from scratch that cost what `parent_steps` of `dense` plus `budget` of `sparse` cost: the
  upcycled arm's whole budget, parent included, spent on the sparse model from the start."""
  return round(parent_steps / flops_ratio(dense, sparse) + budget)


def _steps(total: int, start: int | None = None) -> tuple[str, ...]:
  """A run that ends at `total`, its schedule too (its own decay ends there); `start`: constant LR until then."""
  decay = (f"optim.decay_start={start}",) if start is not None else ()
  return (f"train.steps={total}", f"train.schedule_steps={total}", *decay)


def plan(study: str, root: pathlib.Path, seeds: list[int], budgets: list[int],
         parent_steps: int = MATURE_PARENT) -> list[Run]:
  runs: list[Run] = []
  if study in MATURE:
    return _plan_mature(study, root, seeds, budgets, parent_steps)
  for b in budgets:
    for s in seeds:
      d = root / study / f"b{b}" / f"s{s}"
      total = PRETRAIN + b
      if study == "clip_up":
        sfx = "" if b == 300 else f"_{b}"
        pre = d / "dense_pretrain"
        runs += [
          Run("dense_pretrain", b, s, f"scenes_clip_dense{sfx}_tiny", PRETRAIN, pre,
              (f"train.steps={PRETRAIN}", *_seed(s))),
          Run("dense_continued", b, s, f"scenes_clip_dense{sfx}_tiny", total, d / "dense_continued", _seed(s), pre),
          Run("clip_up", b, s, f"scenes_clip_up{sfx}_tiny", total, d / "clip_up",
              (f"init.upcycle_from={pre}", *_seed(s))),
          Run("sparse_scratch", b, s, f"scenes_clip_sparse_scratch{sfx}_tiny", total, d / "sparse_scratch", _seed(s)),
          Run("dense_active", b, s, f"scenes_clip_dense_active{sfx}_tiny", total, d / "dense_active", _seed(s)),
        ]
        runs += _flop_matched(b, s, d, pre, PRETRAIN, f"scenes_clip_dense{sfx}_tiny", f"scenes_clip_up{sfx}_tiny",
                              f"scenes_clip_sparse_scratch{sfx}_tiny")
        if b == budgets[0] and b == 300:  # the recipe's knobs, at the smaller budget
          shared = d / "dense_shared_pretrain"
          runs += [
            Run("dense_large", b, s, "scenes_clip_dense_large_tiny", total, d / "dense_large", _seed(s)),
            Run("dense_shared_pretrain", b, s, "scenes_clip_dense_shared_tiny", PRETRAIN, shared,
                (f"train.steps={PRETRAIN}", *_seed(s))),
            Run("clip_up_shared", b, s, "scenes_clip_up_shared_tiny", total, d / "clip_up_shared",
                (f"init.upcycle_from={shared}", *_seed(s))),
          ]
          for cf in CAPACITY_FACTORS:
            runs.append(Run(f"clip_up_cf{cf}", b, s, "scenes_clip_up_capacity_tiny", total, d / f"clip_up_cf{cf}",
                            (f"init.upcycle_from={pre}", f"clip.vision.moe.capacity_factor={cf}",
                             f"clip.text.moe.capacity_factor={cf}", *_seed(s))))
      elif study == "lm_upcycle":
        pre = d / "dense_pretrain"
        dense, up = f"lm_dense_mix_{b}_tiny", f"lm_upcycle_mix_{b}_tiny"
        runs += [
          Run("dense_pretrain", b, s, dense, PRETRAIN, pre, (f"train.steps={PRETRAIN}", *_seed(s))),
          Run("dense_continued", b, s, dense, total, d / "dense_continued", _seed(s), pre),
          Run("upcycled", b, s, up, total, d / "upcycled", (f"init.upcycle_from={pre}", *_seed(s))),
          *_flop_matched(b, s, d, pre, PRETRAIN, dense, up),
        ]
      elif study == "capacity":
        # The clip_up study's dense runs on the 600-step schedule: the tiny model (dense_pretrain continued to
        # 600) and the 4x larger one (dense_large); shared with that study, not run twice.
        runs += select(plan("clip_up", root, [s], [300]), ["dense_continued", "dense_large"])
      else:
        raise SystemExit(f"studies: unknown study {study!r}; choose {', '.join(BUDGETS)}")
  return runs


def _flop_matched(b: int, s: int, d: pathlib.Path, pre: pathlib.Path, start: int, dense: str, up: str,
                  scratch: str = "", cosine_from: int | None = None) -> list[Run]:
  """The FLOP-matched arms of budget `b`, seed `s`, each a run whose own schedule ends at the matched budget:
  `dense_flops` (the dense parent continued for the upcycled arm's FLOPs: extra steps x the FLOPs ratio) and, with
  `scratch`, `sparse_flops` (the sparse model from scratch for the upcycled arm's whole FLOPs, parent included).
  `cosine_from`: the continuation keeps the parent's constant LR until then (a warmup-stable-decay parent)."""
  matched = start + matched_steps(b, dense, up)
  wsd = ("optim.schedule=cosine",) if cosine_from is not None else ()
  runs = [Run("dense_flops", b, s, dense, matched, d / "dense_flops",
              (*wsd, *_steps(matched, cosine_from), *_seed(s)), pre, start=start)]
  if scratch:
    n = scratch_steps(start, b, dense, scratch)
    runs.append(Run("sparse_flops", b, s, scratch, n, d / "sparse_flops", (*_steps(n), *_seed(s)), start=start))
  return runs


# Mature-parent studies: (dense, upcycled, from-scratch experiments, extra upcycled arms: {arm: overrides}).
MATURE = {
  "lm_mature": ("lm_dense_mix_wsd_tiny", "lm_upcycle_mix_wsd_tiny", "", {}),
  "clip_mature": ("scenes_clip_dense_wsd_tiny", "scenes_clip_up_wsd_tiny", "scenes_clip_sparse_scratch_wsd_tiny",
                  {"clip_up_dense_lr": ("optim.lr=0.002",)}),  # CLIP-UP at the dense LR, beside the recipe's half
}
UPCYCLED_ARM = {"lm_mature": "upcycled", "clip_mature": "clip_up"}


def _plan_mature(study: str, root: pathlib.Path, seeds: list[int], budgets: list[int], p: int) -> list[Run]:
  """A long dense parent per seed at constant LR (the stable phase of a warmup-stable-decay schedule), shared by
  every budget; per budget B, arms that branch off it at its last step and each decay (cosine to zero) over their
  own length: the dense continuation (B steps), the upcycled model (B steps; CLIP also at the dense LR), the dense
  continuation given the upcycled arm's FLOPs, and (CLIP) the sparse model from scratch given the upcycled arm's
  whole FLOPs, parent included."""
  dense, up, scratch, extra = MATURE[study]
  runs: list[Run] = []
  for s in seeds:
    pre = root / study / f"p{p}" / f"s{s}" / "dense_pretrain"
    runs.append(Run("dense_pretrain", 0, s, dense, p, pre,
                    ("optim.schedule=constant", *_steps(p), f"optim.decay_start={p}", *_seed(s)), start=p))
  for b in budgets:
    for s in seeds:
      d = root / study / f"p{p}" / f"b{b}" / f"s{s}"
      pre = root / study / f"p{p}" / f"s{s}" / "dense_pretrain"
      cosine = ("optim.schedule=cosine",)
      runs.append(Run("dense_continued", b, s, dense, p + b, d / "dense_continued",
                      (*cosine, *_steps(p + b, p), *_seed(s)), pre, start=p))
      for arm, over in {UPCYCLED_ARM[study]: (), **extra}.items():
        runs.append(Run(arm, b, s, up, p + b, d / arm, (f"init.upcycle_from={pre}", *over, *_steps(p + b, p),
                                                       *_seed(s)), start=p))
      runs += _flop_matched(b, s, d, pre, p, dense, up, scratch, cosine_from=p)
  return runs


def upcycle_parent(r: Run) -> str:
  """The run directory an upcycled run starts from ("" when it starts from scratch or a copy)."""
  return next((o.split("=", 1)[1] for o in r.overrides if o.startswith("init.upcycle_from=")), "")


def select(runs: list[Run], arms: list[str]) -> list[Run]:
  """The runs of the given arms and the runs they start from (a copied or upcycled parent), in plan order."""
  known = sorted({r.arm for r in runs})
  bad = [a for a in arms if a not in known]
  if bad:
    raise SystemExit(f"studies: unknown arm {bad[0]!r}; choose from {', '.join(known)}")
  keep = [r for r in runs if r.arm in arms]
  parents = {str(r.copy_from) for r in keep if r.copy_from is not None}
  parents |= {upcycle_parent(r) for r in keep} - {""}
  return [r for r in runs if r.arm in arms or str(r.workdir) in parents]


def last_step(workdir: pathlib.Path) -> int:
  steps = [int(r["step"]) for r in metrics.read_jsonl(workdir) if r.get("split") == "eval"]
  return max(steps, default=-1)


def logged_step(workdir: pathlib.Path) -> int:
  """The last step the run logged anything at (train rows included): how far it got, even before its first eval."""
  return max((int(r["step"]) for r in metrics.read_jsonl(workdir) if "step" in r), default=-1)


def has_checkpoint(workdir: pathlib.Path) -> bool:
  return any(p.name.isdigit() for p in (workdir / "checkpoints").glob("*"))


RESTORED = ".restored"  # in a run directory that records.restore_record made: its files are copies of the record


def restored_copy(r: Run) -> bool:
  """The directory holds only records.restore_record's copy of the run (metrics, no checkpoint): nothing to resume
  from, so a run that is trained starts from its beginning (records.fresh_start clears the copy)."""
  return (r.workdir / RESTORED).exists() and not has_checkpoint(r.workdir)


def todo(runs: list[Run]) -> list[Run]:
  """Unfinished runs, and the finished parents they start from whose checkpoint is gone (a run restored from the
  record keeps its metrics, not its checkpoints: the parent is trained again, deterministically), in plan order."""
  unfinished = [r for r in runs if last_step(r.workdir) < r.steps]
  needed = {str(r.copy_from) for r in unfinished
            if r.copy_from is not None and (not r.workdir.exists() or restored_copy(r))}
  needed |= {upcycle_parent(r) for r in unfinished} - {""}
  return [r for r in runs if r in unfinished or (str(r.workdir) in needed and not has_checkpoint(r.workdir))]


PARENTS = ("dense_pretrain", "dense_shared_pretrain")


def finished(runs: list[Run]) -> list[Run]:
  if STEP_CAP:
    return [r for r in runs if last_step(r.workdir) >= 0]
  return [r for r in runs if last_step(r.workdir) >= r.steps]
