"""`moejax prune --from RUN --keep K [--top-k k] --task TASK [--method eep|random|frequency|soft] [--budget N]
[--rerank N] --to OUT`: a trained MoE shrunk to K experts per MoE layer, chosen (and, for eep, merged) for one
task's calibration split (eep: its best N [20] then re-ranked on the task's dev split), written as an ordinary
run directory (params-only step, config.json with num_experts = K, top_k = k, and `router_map_from` = E when the
result is a merge). `--dry-run` prints the plan and sizes.

Files in OUT besides the run: `prune.json` (method, kept experts or matrices, calibration scores, the search
curve, the re-ranking's dev scores) and, for eep, `prune_archive.json` (the search's archive: a rerun with the same
flags resumes it).
The flags make a `prune.api.PruneConfig` (same defaults) and the work is `prune.api`'s, callable from Python."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from moejax import config

if TYPE_CHECKING:
  from moejax.prune import api


def add_parser(sub) -> argparse.ArgumentParser:
  p = sub.add_parser("prune", help="shrink a trained MoE to fewer experts for a task (EEP search or a baseline)")
  p.add_argument("--from", dest="source", required=True, help="the trained MoE run")
  p.add_argument("--keep", type=int, required=True, help="experts kept per MoE layer")
  p.add_argument("--top-k", type=int, help="experts per token after pruning (default: min(run's top_k, keep))")
  p.add_argument("--task", required=True, help="the moejax_tasks task whose calibration split scores candidates")
  p.add_argument("--method", default="eep", choices=["eep", "random", "frequency", "soft"])
  p.add_argument("--budget", type=int, default=400, help="eep: evaluations of the search [400]")
  p.add_argument("--prune-evals", type=int, help="eep: evaluations of phase 1 (pruning) [budget/4]")
  p.add_argument("--metric", default="exact_match", choices=["exact_match", "loss"], help="the fitness")
  p.add_argument("--calibration", type=int, default=250, help="calibration examples of the task [250: all]")
  p.add_argument("--rerank", type=int, default=20, metavar="N",
                 help="eep: the best N by calibration re-scored on the task's dev split, the best there kept "
                 "[20, the paper's; 0: keep the calibration-best]")
  p.add_argument("--dev", type=int, default=250, help="dev examples of the task for --rerank [250: all]")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--to", help="new run dir (required unless --dry-run)")
  p.add_argument("--dry-run", action="store_true", help="print the plan and the calibration sizes; write nothing")
  p.add_argument("--no-progress", action="store_true")
  return p


def prune_config(args: argparse.Namespace) -> api.PruneConfig:
  """The flags as a `prune.api.PruneConfig`."""
  from moejax.prune import api

  return api.PruneConfig(keep=args.keep, task=args.task, top_k=args.top_k, method=args.method, budget=args.budget,
                         prune_evals=args.prune_evals, metric=args.metric, calibration=args.calibration,
                         rerank=args.rerank, dev=args.dev, seed=args.seed)


def run(args: argparse.Namespace) -> int:
  from moejax.prune import api

  pc = prune_config(args)
  plan = api.plan(args.source, pc, args.to)  # bad input exits 2 here, before anything is read or written
  if args.dry_run:
    print(api.describe(plan))
    return 0
  if plan.to is None:
    raise config.ConfigError("moejax prune needs --to DIR (or --dry-run to only show the plan)")
  summary = api.run(plan, progress=not args.no_progress)
  print(f"pruned {plan.src} -> {plan.to}/checkpoints/{summary['step']}: {plan.cfg.model.moe.num_experts} -> "
        f"{pc.keep} experts, top-{plan.top_k}, {pc.method}{' (merged: router/map)' if summary['mapped'] else ''}; "
        f"calibration {pc.task} exact match {summary['calibration']['exact_match']:.3f} "
        f"(unpruned {summary['unpruned_calibration']['exact_match']:.3f})" + _reranked(summary))
  return 0


def _reranked(summary: dict) -> str:
  r = summary.get("rerank")
  if not r:
    return ""
  how = ("the calibration-best" if r["chosen"] == r["calibration_best"]
         else f"evaluation {r['chosen']}, not the calibration-best {r['calibration_best']}")
  return (f"; dev exact match {summary['dev']['exact_match']:.3f}, the best of the top {len(r['candidates'])} "
          f"re-ranked: {how}")
