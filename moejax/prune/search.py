"""The EEP search (Liu et al. 2024, Alg. 1): evolution over (M, R) candidates, gradient-free, scored by
`fitness.Evaluator`. The population is the archive of every candidate evaluated so far.

Phase 1, pruning (the first `prune_evals` evaluations [100]): `init_pop` [30] random subsets of K experts per
layer (M = R = row selections), then discrete mutations of a parent drawn among the candidates within
`mutate_within` [3.0] points of the best: each row of each layer, with probability `discrete_prob` [0.15], is
moved to an expert not yet kept. Phase 2, merging (up to `budget` [400]): with probability `crossover_prob`
[0.3] a crossover of two parents drawn among those within `crossover_within` [1.0] points of the best (at least
the top `crossover_top` [6]): each row from the first parent with probability `first_parent_prob` [0.6];
otherwise a Gaussian mutation: each group (a layer's M, a layer's R) is changed with probability `group_prob`
[0.25], its entries with probability `mutate_prob` [0.25] by N(0, `mutate_scale` [0.065]), and each row of M
is renormalised to sum 1 with probability `renorm_prob` [0.1]. Phase 2 starts from the whole archive, the
phase-1 selections included (the reference does the same).

Then the re-ranking (`rerank`, the paper's last step): the best `n` [20] of the whole archive by calibration
fitness are scored with the same fitness on the task's dev split (disjoint from calibration and test), and the
best there is the result; n = 0 keeps the calibration-best.

Departures: ties in fitness (exact match on a few hundred examples ties often) are broken by the answer loss,
lower first, instead of at random, both in the search and among the re-ranked (there, then the better calibration
rank, which is how the reference's argmax breaks a tie on dev).

Seeded and resumable: the archive (`archive.json`: every candidate with its scores, the settings and the numpy
generator's state after each evaluation batch) is rewritten atomically after each batch, so a killed search
continues from the last batch and reaches the same final archive as an uninterrupted one. The re-ranking's record
is added to it under "rerank" (absent with n = 0: that file is byte for byte the one without re-ranking).
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Callable

import numpy as np

from moejax import config
from moejax.prune import candidates, fitness


@dataclasses.dataclass(frozen=True)
class SearchConfig:
  budget: int = 400
  prune_evals: int = 100
  init_pop: int = 30
  discrete_prob: float = 0.15
  mutate_prob: float = 0.25
  mutate_scale: float = 0.065
  renorm_prob: float = 0.1
  group_prob: float = 0.25
  crossover_prob: float = 0.3
  first_parent_prob: float = 0.6
  mutate_within: float = 3.0
  crossover_within: float = 1.0
  crossover_top: int = 6
  metric: str = "exact_match"  # exact_match | loss
  batch: int = 4  # candidates proposed (and evaluated in one call) per step
  seed: int = 0

  def __post_init__(self):
    if self.budget <= 0:
      raise config.ConfigError(f"--budget {self.budget} must be > 0 (evaluations of the search)")
    if self.metric not in ("exact_match", "loss"):
      raise config.ConfigError(f"unknown fitness metric {self.metric!r}; choose exact_match or loss")


def _order(archive: list[dict]) -> list[int]:
  """Indices best first: fitness, then lower answer loss, then earlier."""
  return sorted(range(len(archive)), key=lambda i: (-archive[i]["fitness"], archive[i]["ce_loss"], i))


def best(archive: list[dict], selections_only: bool = False) -> dict:
  pool = [a for a in archive if not selections_only or candidates.as_selection(a["cand"]) is not None]
  return pool[_order(pool)[0]]


def _random_subset(rng: np.random.Generator, L: int, K: int, E: int) -> dict:
  return candidates.selection(np.stack([np.sort(rng.choice(E, K, replace=False)) for _ in range(L)]), E)


def _within(archive: list[dict], points: float, at_least: int = 1) -> list[int]:
  order = _order(archive)
  top = archive[order[0]]["fitness"]
  n = sum(1 for i in order if top - archive[i]["fitness"] <= points)
  return order[:max(n, min(at_least, len(order)))]


def _discrete_mutation(rng: np.random.Generator, keep_LK: np.ndarray, E: int, prob: float) -> np.ndarray:
  keep = keep_LK.copy()
  for l in range(keep.shape[0]):
    for i in range(keep.shape[1]):
      if rng.random() < prob:
        free = [e for e in range(E) if e not in keep[l]]
        if free:
          keep[l, i] = free[rng.integers(len(free))]
  return keep


def _gaussian_mutation(rng: np.random.Generator, cand: dict, sc: SearchConfig) -> dict:
  out = {k: np.array(v, np.float32) for k, v in cand.items()}
  L = out["M"].shape[0]
  for l in range(L):
    for name in ("M", "R"):
      if rng.random() < sc.group_prob:
        hit = rng.random(out[name][l].shape) < sc.mutate_prob
        out[name][l] += (hit * rng.normal(0.0, sc.mutate_scale, out[name][l].shape)).astype(np.float32)
    for i in range(out["M"].shape[1]):
      if rng.random() < sc.renorm_prob:
        s = out["M"][l, i].sum()
        if abs(s) > 1e-6:
          out["M"][l, i] /= s
  return out


def _crossover(rng: np.random.Generator, a: dict, b: dict, first_prob: float) -> dict:
  out = {k: np.array(v, np.float32) for k, v in a.items()}
  L, K, _ = out["M"].shape
  for l in range(L):
    for name in ("M", "R"):
      for i in range(K):
        if rng.random() >= first_prob:
          out[name][l, i] = b[name][l, i]
  return out


def propose(rng: np.random.Generator, archive: list[dict], n_done: int, sc: SearchConfig, L: int, K: int,
            E: int) -> tuple[dict, str]:
  """The next candidate and how it was made (init | discrete | mutate | crossover)."""
  if n_done < min(sc.init_pop, sc.prune_evals):
    return _random_subset(rng, L, K, E), "init"
  if n_done < sc.prune_evals:
    sel = [a for a in archive if candidates.as_selection(a["cand"]) is not None]
    parent = sel[_within(sel, sc.mutate_within)[rng.integers(len(_within(sel, sc.mutate_within)))]]
    keep = _discrete_mutation(rng, candidates.as_selection(parent["cand"]), E, sc.discrete_prob)
    return candidates.selection(keep, E), "discrete"
  if len(archive) >= 2 and rng.random() < sc.crossover_prob:
    pool = _within(archive, sc.crossover_within, sc.crossover_top)
    i, j = rng.choice(len(pool), 2, replace=False)
    return _crossover(rng, archive[pool[i]]["cand"], archive[pool[j]]["cand"], sc.first_parent_prob), "crossover"
  pool = _within(archive, sc.mutate_within)
  return _gaussian_mutation(rng, archive[pool[rng.integers(len(pool))]]["cand"], sc), "mutate"


# ----------------------------------------------------------------------------------------------------------
# The archive on disk (JSON; no pickle)
# ----------------------------------------------------------------------------------------------------------


def _save(path: pathlib.Path, state: dict) -> None:
  tmp = path.with_suffix(".json.tmp")
  tmp.write_text(json.dumps(state))
  os.replace(tmp, path)  # atomic: a kill leaves the previous archive or the new one, never half of one


def _load(path: pathlib.Path, meta: dict) -> dict | None:
  if not path.is_file():
    return None
  state = json.loads(path.read_text())
  if state.get("meta") != meta:
    raise config.ConfigError(f"{path} is the archive of another search ({state.get('meta')}); this one is "
                             f"{meta}: choose another --archive or delete it")
  for a in state["archive"]:
    a["cand"] = candidates.from_json(a["cand"])
  return state


def run(evaluate: Callable[[list[dict]], list[dict]], L: int, K: int, E: int, sc: SearchConfig, *,
        archive_path: str | pathlib.Path | None = None, meta: dict | None = None,
        stop_after: int | None = None, progress: Callable[[int, int, float], None] | None = None) -> list[dict]:
  """Run (or continue) the search up to `sc.budget` evaluations; returns the archive: [{"cand", "fitness",
  "exact_match", "ce_loss", "how", "eval"}]. `stop_after` (tests: a kill) returns after that many evaluations."""
  meta = {"search": dataclasses.asdict(sc), "L": L, "K": K, "E": E, **(meta or {})}
  path = pathlib.Path(archive_path) if archive_path else None
  state = _load(path, meta) if path else None
  rng = np.random.default_rng(sc.seed)
  archive: list[dict] = []
  if state:
    archive = state["archive"]
    rng.bit_generator.state = state["rng"]
  while len(archive) < sc.budget and (stop_after is None or len(archive) < stop_after):
    n = min(sc.batch, sc.budget - len(archive))
    if len(archive) < sc.prune_evals:
      n = min(n, sc.prune_evals - len(archive))  # phase 2 proposes from a complete phase 1
    if len(archive) < sc.init_pop:
      n = min(n, sc.init_pop - len(archive))
    props = [propose(rng, archive, len(archive), sc, L, K, E) for _ in range(n)]
    scores = evaluate([c for c, _ in props])
    for (c, how), s in zip(props, scores):
      archive.append({"cand": c, "fitness": fitness.fitness(s, sc.metric), **s, "how": how, "eval": len(archive)})
    if path:
      _save(path, {"meta": meta, "rng": rng.bit_generator.state,
                   "archive": [dict(a, cand=candidates.to_json(a["cand"])) for a in archive]})
    if progress:
      progress(len(archive), sc.budget, best(archive)["fitness"])
  return archive


def rerank(archive: list[dict], evaluate: Callable[[list[dict]], list[dict]], n: int, metric: str, *,
           archive_path: str | pathlib.Path | None = None, info: dict | None = None) -> dict | None:
  """The paper's last step: the best `n` of the archive by calibration (`_order`) scored by `evaluate` (the same
  fitness on the dev split), the best there chosen. Returns (and, with `archive_path`, adds to that archive file
  under "rerank") the record: {"n", **info, "calibration_best", "chosen" (archive indices, `eval`), "candidates":
  [{"eval", "calibration_rank", "calibration_fitness", "fitness", "exact_match", "ce_loss"} (dev scores)]}.
  n = 0: no re-ranking, None, and an earlier record leaves the file (a finished search rerun with n = 0)."""
  if n < 0:
    raise config.ConfigError(f"--rerank {n} must be >= 0 (0: no re-ranking)")
  path = pathlib.Path(archive_path) if archive_path else None
  if n == 0:
    if path and path.is_file():
      state = json.loads(path.read_text())
      if state.pop("rerank", None) is not None:
        _save(path, state)
    return None
  order = _order(archive)[:n]
  scores = evaluate([archive[i]["cand"] for i in order])
  rows = [{"eval": archive[i]["eval"], "calibration_rank": r, "calibration_fitness": archive[i]["fitness"],
           "fitness": fitness.fitness(s, metric), **s} for r, (i, s) in enumerate(zip(order, scores))]
  won = _order(rows)[0]  # dev fitness, then dev answer loss, then calibration rank (rows are in that order)
  record = {"n": n, **(info or {}), "calibration_best": rows[0]["eval"], "chosen": rows[won]["eval"],
            "candidates": rows}
  if path:
    _save(path, dict(json.loads(path.read_text()), rerank=record))
  return record


def curve(archive: list[dict]) -> list[float]:
  """Best fitness after each evaluation."""
  out, b = [], -np.inf
  for a in archive:
    b = max(b, a["fitness"])
    out.append(float(b))
  return out
