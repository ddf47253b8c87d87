"""Pruning as a library: `prune(source, PruneConfig(keep=4, task="lookup"), to)` shrinks a trained MoE run to K
experts per MoE layer, chosen (and, for eep, merged) for one task's calibration split (eep: the best 20 of the
search then re-ranked on the task's dev split), and writes an ordinary run directory into `to`; `moejax prune`
(prune/cli.py) is its command line, flag for flag.

`plan` checks everything it can before a checkpoint is read (bad input is a `ConfigError` there, before anything
is written), `describe` is the dry run, `run` does the work. Files in `to` besides the run (a params-only step,
config.json with num_experts = K, top_k = k, and `router_map_from` = E when the result is a merge): `prune.json`
(the summary `run` returns) and, for eep, `prune_archive.json` (the search's archive, with the re-ranking's
record under "rerank": a rerun with the same settings resumes it). Without `to` nothing is written and the
summary is all that comes back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import pathlib
import re
import sys
import time
import warnings

import jax

from moejax import checkpoint, config, paths, runs, sharding
from moejax.data import tasks
from moejax.layers import moe
from moejax.models import transformer
from moejax.prune import baselines, candidates, fitness, search

METHODS = ("eep", "random", "frequency", "soft")


@dataclasses.dataclass(frozen=True)
class PruneConfig:
  """What to prune to and how; the defaults are `moejax prune`'s."""

  keep: int  # experts kept per MoE layer
  task: str  # the moejax_tasks task whose calibration split scores candidates
  top_k: int | None = None  # experts per token after pruning; None: min(the run's top_k, keep)
  method: str = "eep"  # eep | random | frequency | soft
  budget: int = 400  # eep: evaluations of the search
  prune_evals: int | None = None  # eep: evaluations of phase 1 (pruning); None: budget / 4
  metric: str = "exact_match"  # the fitness: exact_match | loss
  calibration: int = 250  # calibration examples of the task (250: all)
  rerank: int = 20  # eep: the best N by calibration re-scored on the dev split, the best there kept; 0: off
  dev: int = 250  # dev examples of the task for the re-ranking (250: all)
  seed: int = 0

  def __post_init__(self):
    if self.method not in METHODS:
      raise config.ConfigError(f"prune method {self.method!r} unknown; choose one of {', '.join(METHODS)}")


@dataclasses.dataclass(frozen=True)
class Plan:
  """A checked prune: the source run and its config, the settings resolved, and where the result goes."""

  src: pathlib.Path
  cfg: config.ExperimentConfig
  pc: PruneConfig
  top_k: int
  search: search.SearchConfig
  to: pathlib.Path | None


def plan(source: str | os.PathLike, pc: PruneConfig, to: str | os.PathLike | None = None) -> Plan:
  """Everything checkable before reading a checkpoint: the source is a whole LM MoE run, the task exists, the
  numbers fit it, and `to` (if given) is a place for a new run."""
  src = paths.in_dir(source, "--from")
  cfg = checkpoint.read_model_config(src, "prune --from")
  if cfg.task != "lm":
    raise config.ConfigError(f"prune needs a language model run; {src} has task={cfg.task!r}")
  try:
    tasks.check_names([pc.task])
  except tasks.UnknownTask as e:
    raise config.ConfigError(f"--task: {e}") from None
  top_k = pc.top_k if pc.top_k is not None else min(cfg.model.moe.top_k, pc.keep)
  candidates.check_prunable(cfg.model, pc.keep, top_k)
  if pc.calibration <= 0:
    raise config.ConfigError(f"--calibration {pc.calibration} must be > 0")
  if pc.rerank < 0:
    raise config.ConfigError(f"--rerank {pc.rerank} must be >= 0 (0: keep the calibration-best, no dev split)")
  if pc.dev <= 0:
    raise config.ConfigError(f"--dev {pc.dev} must be > 0")
  budget = pc.budget if pc.method == "eep" else 1
  prune_evals = pc.prune_evals if pc.prune_evals is not None else max(1, budget // 4)
  sc = search.SearchConfig(budget=pc.budget, prune_evals=min(prune_evals, pc.budget),
                           init_pop=min(30, prune_evals), metric=pc.metric, seed=pc.seed)
  if to is not None:
    to = runs.check_destination(paths.out_dir(to, "--to"), source=src)
  return Plan(src, cfg, pc, top_k, sc, to)


def _calibration(p: Plan) -> tuple[list[tuple[str, str]], dict]:
  pairs = fitness.split_pairs(p.pc.task, "calibration", p.pc.calibration)
  return pairs, fitness.task_batch(p.cfg, pairs)


def _dev(p: Plan, calibration: dict) -> tuple[list[tuple[str, str]], dict]:
  """The re-ranking's examples, padded to the calibration batch's width when narrower: with as many examples as
  calibration (the default, 250 each) the dev batch has its shape and the fitness compiles nothing new."""
  pairs = fitness.split_pairs(p.pc.task, "dev", p.pc.dev)
  return pairs, fitness.task_batch(p.cfg, pairs, min_length=calibration["tokens"].shape[1])


def describe(p: Plan) -> str:
  """The dry run: the plan, its sizes and the calibration data; reads no checkpoint, writes nothing."""
  pc, sc, m = p.pc, p.search, p.cfg.model.moe
  pairs, batch = _calibration(p)
  L = len(candidates.moe_layers(p.cfg.model))
  return (f"prune {p.src} ({p.cfg.name}): {L} MoE layers, {m.num_experts} -> {pc.keep} experts, top-{m.top_k} "
          f"-> top-{p.top_k}; method {pc.method}"
          + (f", budget {sc.budget} evaluations ({sc.prune_evals} pruning, {sc.budget - sc.prune_evals} merging), "
             f"fitness {sc.metric}, seed {sc.seed}" if pc.method == "eep" else "")
          + f"\ncalibration: task {pc.task!r}, {len(pairs)} examples x {batch['tokens'].shape[1] - 1} positions "
          f"(held-out test split: {len(fitness.split_pairs(pc.task, 'test'))} examples)"
          + (f"\nre-ranking: the best {pc.rerank} by calibration re-scored on {len(_dev(p, batch)[0])} dev "
             "examples, the best there kept" if pc.method == "eep" and pc.rerank else "")
          + (f"\nwould write {p.to}" if p.to else ""))


def prune(source: str | os.PathLike, pc: PruneConfig, to: str | os.PathLike | None = None,
          progress: bool = True) -> dict:
  """`run(plan(source, pc, to), progress)`: the summary (prune.json's content)."""
  return run(plan(source, pc, to), progress)


def run(p: Plan, progress: bool = True) -> dict:
  """Search (eep) or pick (a baseline) the experts to keep, write the pruned run into `p.to` (when given) and
  return the summary; `progress`: a bar on stderr for the eep search."""
  pairs, batch = _calibration(p)
  with warnings.catch_warnings():
    # top-1 renormalized is what a pruned Mixtral computes at k=1; the warning is about training, not this
    warnings.filterwarnings("ignore", message=re.escape(moe.TOP1_RENORMALIZE_WARNING[:40]))
    return _run(p, pairs, batch, progress)


def _run(p: Plan, pairs: list[tuple[str, str]], batch: dict, progress: bool) -> dict:
  cfg, pc, sc, to = p.cfg, p.pc, p.search, p.to
  m = cfg.model.moe
  L = len(candidates.moe_layers(cfg.model))
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                          transformer.specs(cfg.model), is_leaf=sharding.is_spec)
  params, step = checkpoint.load_params(p.src, abstract)
  ev = fitness.Evaluator(params, cfg, keep=pc.keep, top_k=p.top_k, batch=batch)
  t0 = time.time()
  # the claim is held from the search's first result file to the checkpoint
  with runs.claim(to) if to is not None else contextlib.nullcontext():
    archive, rerank = [], None
    if pc.method == "eep":
      bar = _bar(sc.budget) if progress else None

      def report(n, total, best):
        if bar is not None:
          bar.n = n
          bar.set_postfix(best=f"{best:.2f}")
          bar.refresh()

      archive_path = to / "prune_archive.json" if to is not None else None
      archive = search.run(ev, L, pc.keep, m.num_experts, sc, archive_path=archive_path,
                           meta={"from": str(p.src), "task": pc.task, "top_k": p.top_k, "calibration": len(pairs)},
                           progress=report)
      if bar is not None:
        bar.close()
      # the dev split is read only when used: --rerank 0 evaluates (and writes) what it did before re-ranking
      dev_pairs, dev_batch = _dev(p, batch) if pc.rerank else ([], None)
      rerank = search.rerank(archive, ev.on(dev_batch) if pc.rerank else None, pc.rerank, sc.metric,
                             archive_path=archive_path, info={"split": "dev", "examples": len(dev_pairs)})
      chosen = archive[rerank["chosen"]] if rerank else search.best(archive)
    else:
      cand = baselines.candidate(pc.method, params, cfg.model, batch, pc.keep, pc.seed)
      chosen = {"cand": cand, **ev([cand])[0]}
    mapped = candidates.is_mapped_output(cfg.model, chosen["cand"])
    if to is not None:
      save(to, cfg, params, chosen["cand"], p.top_k, step)
    summary = _summary(p, step, len(pairs), chosen, mapped, ev.plain(), archive, time.time() - t0, rerank)
    if to is not None:
      (to / "prune.json").write_text(json.dumps(summary, indent=1))
  return summary


def save(to: str | os.PathLike, cfg: config.ExperimentConfig, params: dict, cand: dict, top_k: int,
         step: int) -> None:
  """The run of `cfg`'s model pruned by `cand` (K = its rows) at top-`top_k`, written into `to` (held by
  `runs.claim`): sliced experts where the candidate is an exact selection, else merged ones with a router map.
  `candidates.identity` keeps every expert: the unpruned model at another top-k."""
  mapped = candidates.is_mapped_output(cfg.model, cand)
  out_cfg = config.derive(cfg, {"model.moe.num_experts": int(cand["M"].shape[1]), "model.moe.top_k": top_k,
                                "model.moe.router_map_from": cfg.model.moe.num_experts if mapped else 0})
  runs.save_params(to, runs.target(out_cfg), candidates.apply(params, cfg.model, cand, mapped=mapped), step)


def _bar(total: int):
  from tqdm import tqdm

  return tqdm(total=total, unit="eval", file=sys.stderr, dynamic_ncols=True)


def _summary(p: Plan, step: int, n_pairs: int, chosen: dict, mapped: bool, unpruned: dict, archive: list[dict],
             seconds: float, rerank: dict | None = None) -> dict:
  keep_LK = candidates.as_selection(chosen["cand"])
  summary = {
    "from": str(p.src), "step": step, "task": p.pc.task, "method": p.pc.method, "keep": p.pc.keep,
    "top_k": p.top_k, "mapped": mapped, "calibration_examples": n_pairs, "metric": p.search.metric,
    "calibration": {"exact_match": chosen["exact_match"], "ce_loss": chosen["ce_loss"]},
    "unpruned_calibration": unpruned,
    "kept_experts": None if keep_LK is None else keep_LK.tolist(),
    "candidate": candidates.to_json(chosen["cand"]), "seconds": round(seconds, 1),
  }
  if archive:
    best_sel = search.best(archive, selections_only=True)
    summary.update(evaluations=len(archive), curve=search.curve(archive),
                   best_pruning={"exact_match": best_sel["exact_match"], "ce_loss": best_sel["ce_loss"],
                                 "kept_experts": candidates.as_selection(best_sel["cand"]).tolist()})
  if rerank:  # absent with --rerank 0: that summary is the one without re-ranking, key for key
    won = next(r for r in rerank["candidates"] if r["eval"] == rerank["chosen"])
    summary.update(dev={"exact_match": won["exact_match"], "ce_loss": won["ce_loss"]}, rerank=rerank)
  return summary
