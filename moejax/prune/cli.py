"""`moejax prune --from RUN --keep K [--top-k k] --task TASK [--method eep|random|frequency|soft] [--budget N]
--to OUT`: a trained MoE shrunk to K experts per MoE layer, chosen (and, for eep, merged) for one task's
calibration split, written as an ordinary run directory (params-only step, config.json with num_experts = K,
top_k = k, and `router_map_from` = E when the result is a merge). `--dry-run` prints the plan and sizes.

Files in OUT besides the run: `prune.json` (method, kept experts or matrices, calibration scores, the search
curve) and, for eep, `prune_archive.json` (the search's archive: a rerun with the same flags resumes it)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from moejax import config


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
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--to", help="new run dir (required unless --dry-run)")
  p.add_argument("--dry-run", action="store_true", help="print the plan and the calibration sizes; write nothing")
  p.add_argument("--no-progress", action="store_true")
  return p


def _plan(args) -> dict:
  """Everything checkable before reading a checkpoint (bad input exits 2 here, before anything is written)."""
  from moejax import checkpoint, paths
  from moejax.data import tasks
  from moejax.prune import candidates, search

  src = paths.in_dir(args.source, "--from")
  cfg = checkpoint.read_model_config(src, "prune --from")
  if cfg.task != "lm":
    raise config.ConfigError(f"prune needs a language model run; {src} has task={cfg.task!r}")
  try:
    tasks.check_names([args.task])
  except tasks.UnknownTask as e:
    raise config.ConfigError(f"--task: {e}") from None
  top_k = args.top_k if args.top_k is not None else min(cfg.model.moe.top_k, args.keep)
  candidates.check_prunable(cfg.model, args.keep, top_k)
  if args.calibration <= 0:
    raise config.ConfigError(f"--calibration {args.calibration} must be > 0")
  budget = args.budget if args.method == "eep" else 1
  prune_evals = args.prune_evals if args.prune_evals is not None else max(1, budget // 4)
  sc = search.SearchConfig(budget=args.budget, prune_evals=min(prune_evals, args.budget),
                           init_pop=min(30, prune_evals), metric=args.metric, seed=args.seed)
  if args.to is None and not args.dry_run:
    raise config.ConfigError("moejax prune needs --to DIR (or --dry-run to only show the plan)")
  to = paths.out_dir(args.to, "--to") if args.to else None
  if to is not None:
    if to.resolve() == src.resolve():
      raise config.ConfigError(f"--to {to} is the source run; choose a new directory")
    if checkpoint.step_numbers(to) if (to / "checkpoints").is_dir() else False:
      raise config.ConfigError(f"{to} already holds checkpoints; choose an empty --to")
  return {"src": src, "cfg": cfg, "top_k": top_k, "search": sc, "to": to}


def run(args) -> int:
  plan = _plan(args)
  cfg, top_k, sc, to = plan["cfg"], plan["top_k"], plan["search"], plan["to"]
  from moejax.prune import candidates, fitness

  pairs = fitness.split_pairs(args.task, "calibration", args.calibration)
  batch = fitness.task_batch(cfg, pairs)
  m = cfg.model.moe
  L = len(candidates.moe_layers(cfg.model))
  if args.dry_run:
    print(f"prune {plan['src']} ({cfg.name}): {L} MoE layers, {m.num_experts} -> {args.keep} experts, top-{m.top_k} "
          f"-> top-{top_k}; method {args.method}"
          + (f", budget {sc.budget} evaluations ({sc.prune_evals} pruning, {sc.budget - sc.prune_evals} merging), "
             f"fitness {sc.metric}, seed {sc.seed}" if args.method == "eep" else "")
          + f"\ncalibration: task {args.task!r}, {len(pairs)} examples x {batch['tokens'].shape[1] - 1} positions "
          f"(held-out test split: {len(fitness.split_pairs(args.task, 'test'))} examples)"
          + (f"\nwould write {to}" if to else ""))
    return 0
  import warnings

  import jax

  from moejax import checkpoint, paths, sharding, train
  from moejax.layers import moe

  # top-1 renormalized is what a pruned Mixtral computes at k=1; the warning is about training, not this
  warnings.filterwarnings("ignore", message=re.escape(moe.TOP1_RENORMALIZE_WARNING[:40]))
  from moejax.models import transformer
  from moejax.prune import baselines, search

  specs = transformer.specs(cfg.model)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), specs,
                          is_leaf=sharding.is_spec)
  params, step = checkpoint.load_params(plan["src"], abstract)
  ev = fitness.Evaluator(params, cfg, keep=args.keep, top_k=top_k, batch=batch)
  t0 = time.time()
  with paths.claim_new_run(to, "--to"):  # held from the search's first result file to the checkpoint
    archive = []
    if args.method == "eep":
      bar = None
      if not args.no_progress:
        from tqdm import tqdm

        bar = tqdm(total=sc.budget, unit="eval", file=sys.stderr, dynamic_ncols=True)

      def progress(n, total, best):
        if bar is not None:
          bar.n = n
          bar.set_postfix(best=f"{best:.2f}")
          bar.refresh()

      archive = search.run(ev, L, args.keep, m.num_experts, sc, archive_path=to / "prune_archive.json",
                           meta={"from": str(plan["src"]), "task": args.task, "top_k": top_k,
                                 "calibration": len(pairs)}, progress=progress)
      if bar is not None:
        bar.close()
      chosen = search.best(archive)
    else:
      cand = baselines.candidate(args.method, params, cfg.model, batch, args.keep, args.seed)
      chosen = {"cand": cand, **ev([cand])[0]}
    mapped = candidates.is_mapped_output(cfg.model, chosen["cand"])
    out_params = candidates.apply(params, cfg.model, chosen["cand"], mapped=mapped)
    out_cfg = config.derive(cfg, {"model.moe.num_experts": args.keep, "model.moe.top_k": top_k,
                                  "model.moe.router_map_from": m.num_experts if mapped else 0})
    s = train.setup(out_cfg)
    (to / "config.json").write_text(config.to_json(out_cfg))
    with checkpoint.Manager(to, keep=out_cfg.train.keep_checkpoints) as mngr:
      mngr.save(step, train.params_only_state(s, out_params, step), out_cfg, force=True)
    keep_LK = candidates.as_selection(chosen["cand"])
    summary = {
      "from": str(plan["src"]), "step": step, "task": args.task, "method": args.method, "keep": args.keep,
      "top_k": top_k, "mapped": mapped, "calibration_examples": len(pairs), "metric": sc.metric,
      "calibration": {"exact_match": chosen["exact_match"], "ce_loss": chosen["ce_loss"]},
      "unpruned_calibration": ev.plain(),
      "kept_experts": None if keep_LK is None else keep_LK.tolist(),
      "candidate": candidates.to_json(chosen["cand"]), "seconds": round(time.time() - t0, 1),
    }
    if archive:
      best_sel = search.best(archive, selections_only=True)
      summary.update(evaluations=len(archive), curve=search.curve(archive),
                     best_pruning={"exact_match": best_sel["exact_match"], "ce_loss": best_sel["ce_loss"],
                                   "kept_experts": candidates.as_selection(best_sel["cand"]).tolist()})
    (to / "prune.json").write_text(json.dumps(summary, indent=1))
    print(f"pruned {plan['src']} -> {to}/checkpoints/{step}: {m.num_experts} -> {args.keep} experts, top-{top_k}, "
          f"{args.method}{' (merged: router/map)' if mapped else ''}; calibration {args.task} exact match "
          f"{chosen['exact_match']:.3f} (unpruned {summary['unpruned_calibration']['exact_match']:.3f})")
  return 0
