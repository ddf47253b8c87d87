"""The EEP study of docs/results.md ("Expert pruning and merging: EEP"): a trained MoE pruned 8 -> 4 (top-2) and
8 -> 2 (top-1) experts for each of --tasks, by EEP (the search on the task's calibration split, its best --rerank
[20] re-scored on the dev split and the best there kept, as the paper does) over three search seeds, against the
calibration-best of the same searches, the best phase-1 pruning, random subsets (three draws), the most
frequently routed experts, the largest summed router probability ("soft") and the unpruned model (at its own
top-k and at the pruned top-k), every model scored on the held-out TEST split of every task of the model's
data.tasks and on the text domains' eval loss.

  python scripts/eep_study.py --run RUN --out runs/eep_study [--tasks reverse,sort] [--seeds 0 1 2] [--budget 400]
  python scripts/eep_study.py --run RUN --out runs/eep_study --speed    (then decode speed: on a quiet machine)
  python scripts/eep_study.py --out runs/eep_study --store results/studies/eep   (copy the records)
  python scripts/eep_study.py --write-docs [--store results/studies/eep]  (docs/results.md's EEP blocks, figure)

Records (JSON, each with its provenance: commit, CPU, cores, load, jax version, wall and CPU seconds) in OUT:
study.json (the settings), searches/<task>_k<K>_s<seed>.json (curve, re-ranking, choices), evals/<name>.json
(one model: its candidate, calibration and test scores, text losses; studylib/eep.py names them), speed/*.json
(`moejax bench infer --json`). Not recorded: archives/ (each search's archive, its resumable state) and
speed_runs/ (the pruned run directories the speed mode writes and times).

Resumable: a search continues from its archive, and a finished search or evaluation (its record exists) is not
redone; rerun the same command. A model already scored (the same candidate at the same top-k: a random draw for
another task, an EEP pick that is also the calibration-best) is not scored twice.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import sys
import time
import warnings

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # studylib, beside this script

import jax  # noqa: E402
import numpy as np  # noqa: E402
from studylib import eep  # noqa: E402

from moejax import checkpoint, config, provenance, sharding  # noqa: E402
from moejax import runs as runs_lib  # noqa: E402
from moejax.models import transformer  # noqa: E402
from moejax.prune import api, baselines, candidates, fitness, search  # noqa: E402
from moejax.tasks import lm_eval  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
RECORDED = ("study.json", "searches", "evals", "speed")


def parse(argv: list[str] | None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="eep_study", description=__doc__.split("\n\n")[0])
  ap.add_argument("--run", help="the trained MoE run (read only)")
  ap.add_argument("--out", help="the study's working directory")
  ap.add_argument("--tasks", default=",".join(eep.DEFAULTS["tasks"]), help="the tasks to prune for [reverse,sort]")
  ap.add_argument("--keeps", default="4:2,2:1", help="keep:top_k pairs [4:2,2:1]")
  ap.add_argument("--seeds", type=int, nargs="+", default=eep.DEFAULTS["seeds"], help="search seeds [0 1 2]")
  ap.add_argument("--budget", type=int, default=400, help="evaluations per search [400]")
  ap.add_argument("--calibration", type=int, default=250, help="calibration examples per task [250: all]")
  ap.add_argument("--rerank", type=int, default=20, help="the best N by calibration re-ranked on dev [20]")
  ap.add_argument("--dev", type=int, default=250, help="dev examples per task for the re-ranking [250: all]")
  ap.add_argument("--test", type=int, default=None, help="test examples per task [all 500]")
  ap.add_argument("--random-draws", type=int, default=eep.DEFAULTS["random_draws"])
  ap.add_argument("--speed", action="store_true", help="then time the EEP pick of each keep (moejax bench infer)")
  ap.add_argument("--speed-task", help="whose EEP pick (seed: the first of --seeds) is timed [the first task]")
  ap.add_argument("--speed-batch", default="1,32")
  ap.add_argument("--speed-repeats", type=int, default=5)
  ap.add_argument("--speed-new-tokens", type=int, default=64)
  ap.add_argument("--store", help="copy OUT's records here (e.g. results/studies/eep); with --write-docs: read them "
                                  "from here [results/studies/eep]")
  ap.add_argument("--write-docs", action="store_true", help="regenerate docs/results.md's EEP blocks and figure from "
                                                            "--store alone (nothing else is read or run)")
  ap.add_argument("--doc", default=str(ROOT / "docs" / "results.md"))
  ap.add_argument("--png", default=str(ROOT / "docs" / "img" / eep.PNG))
  a = ap.parse_args(argv)
  if not a.write_docs and not a.out:
    ap.error("--out is needed (or --write-docs)")
  if (a.speed or not a.store) and not a.write_docs and not a.run:
    ap.error("--run is needed to run the study or its --speed mode")
  return a


def main(argv: list[str] | None = None) -> int:
  a = parse(argv)
  if a.write_docs:
    for line in eep.write_docs(pathlib.Path(a.store or ROOT / "results" / "studies" / "eep"), pathlib.Path(a.doc),
                               pathlib.Path(a.png)):
      print(f"eep_study: wrote {line}")
    return 0
  out = pathlib.Path(a.out)
  if a.run:
    warnings.filterwarnings("ignore", message="moe.top_k=1 with moe.renormalize")
    study = Study(a, pathlib.Path(a.run), out)
    study.run()  # with every record there: nothing to do
    if a.speed:
      study.speed()
  if a.store:
    store(out, pathlib.Path(a.store))
  return 0


def store(out: pathlib.Path, dst: pathlib.Path) -> None:
  """Copy the records (not the archives, not the speed runs) from OUT to `dst`, mirroring OUT."""
  n = 0
  for name in RECORDED:
    src = out / name
    if src.is_file():
      dst.mkdir(parents=True, exist_ok=True)
      shutil.copy2(src, dst / name)
      n += 1
    for f in sorted(src.glob("*.json")) if src.is_dir() else []:
      (dst / name).mkdir(parents=True, exist_ok=True)
      shutil.copy2(f, dst / name / f.name)
      n += 1
  print(f"eep_study: {n} records copied from {out} to {dst}")


def _write(path: pathlib.Path, rec: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_suffix(".tmp")
  tmp.write_text(json.dumps(rec, indent=1))
  os.replace(tmp, path)  # a killed study leaves a whole record or none


@contextlib.contextmanager
def timed(rec: dict):
  """Adds provenance (at the start, and the load at the end), wall and CPU seconds (this process) to `rec`."""
  prov, t0, c0 = provenance.record(ROOT), time.time(), time.process_time()
  yield rec
  rec.update(seconds=round(time.time() - t0, 2), cpu_seconds=round(time.process_time() - c0, 2),
             provenance=provenance.finished(prov))


def digest(cand: dict, top_k: int) -> str:
  h = hashlib.sha1(str(top_k).encode())
  for k in ("M", "R"):
    h.update(np.ascontiguousarray(cand[k], np.float32).tobytes())
  return h.hexdigest()


class Study:
  def __init__(self, a: argparse.Namespace, run: pathlib.Path, out: pathlib.Path):
    self.a, self.run_dir, self.out = a, run, out
    cfg = checkpoint.read_config(run)
    dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                            transformer.specs(cfg.model), is_leaf=sharding.is_spec)
    params, self.step = checkpoint.load_params(run, abstract)
    self.cfg, self.params = cfg, jax.device_get(params)
    self.mesh = sharding.make_mesh(cfg.mesh)
    self.tasks = a.tasks.split(",")
    self.model_tasks = list(cfg.data.tasks)
    missing = [t for t in self.tasks if t not in self.model_tasks]
    if missing:
      raise config.ConfigError(f"--tasks {','.join(missing)}: not in the model's data.tasks "
                               f"{', '.join(self.model_tasks)}")
    self.keeps = [tuple(int(v) for v in kv.split(":")) for kv in a.keeps.split(",")]
    self.E, self.k0 = cfg.model.moe.num_experts, cfg.model.moe.top_k
    self.L = len(candidates.moe_layers(cfg.model))
    self.texts = [n for n, _ in cfg.data.mixture if n != "moejax_tasks"]
    self.calib = {t: fitness.task_batch(cfg, fitness.split_pairs(t, "calibration", a.calibration))
                  for t in self.tasks}
    test = {t: fitness.split_pairs(t, "test", a.test) for t in self.model_tasks}
    width = max(fitness.task_batch(cfg, p)["tokens"].shape[1] for p in test.values())
    self.test = {t: fitness.task_batch(cfg, p, width) for t, p in test.items()}  # one width: one compile
    self._search_ev, self._single_ev = {}, {}
    self.scored = {r["digest"]: r for r in eep.load(out).evals.values() if "digest" in r}

  def settings(self) -> dict:
    a = self.a
    return {"run": str(self.run_dir), "step": self.step, "model": self.cfg.name, "tasks": self.tasks,
            "model_tasks": self.model_tasks, "keeps": [list(k) for k in self.keeps], "seeds": a.seeds,
            "budget": a.budget, "calibration": a.calibration, "rerank": a.rerank, "dev": a.dev,
            "test": len(next(iter(self.test.values()))["tokens"]), "random_draws": a.random_draws,
            "text": self.texts, "experts": self.E, "top_k": self.k0}

  # evaluators: the search's (candidates in chunks of 4) and one-at-a-time for the rest, per (keep, top_k); each
  # scores every batch through `.on` (a new batch shape compiles once, the same shape never again)
  def search_ev(self, keep: int, top_k: int, task: str) -> fitness.Evaluator:
    if (keep, top_k) not in self._search_ev:
      self._search_ev[keep, top_k] = fitness.Evaluator(self.params, self.cfg, keep=keep, top_k=top_k,
                                                       batch=self.calib[task])
    return self._search_ev[keep, top_k]

  def single(self, keep: int, top_k: int, batch: dict):
    if (keep, top_k) not in self._single_ev:
      self._single_ev[keep, top_k] = fitness.Evaluator(self.params, self.cfg, keep=keep, top_k=top_k, batch=batch,
                                                       chunk=1)
    return self._single_ev[keep, top_k].on(batch)

  def text_losses(self, cand: dict, keep: int, top_k: int) -> dict[str, float]:
    mapped = candidates.is_mapped_output(self.cfg.model, cand)
    exp = dataclasses.replace(self.cfg, model=candidates.pruned_config(self.cfg.model, keep, top_k, mapped))
    p = candidates.apply(self.params, self.cfg.model, cand, mapped=mapped)
    return {n: lm_eval.evaluate_text(p, exp, self.mesh, n)["ce_loss"] for n in self.texts}

  def evaluate(self, name: str, cand: dict, keep: int, top_k: int, calibration: dict | None = None,
               **meta) -> dict:
    """The record `evals/<name>.json`: test exact match on every task of the model, text losses, and the
    calibration scores given (or scored here on the tasks in `calibration`: {task: None})."""
    path = self.out / "evals" / f"{name}.json"
    if path.is_file():
      return json.loads(path.read_text())
    key = digest(cand, top_k)
    with timed({"name": name, "keep": keep, "top_k": top_k, **meta, "digest": key}) as rec:
      cal = {t: s if s is not None else self.single(keep, top_k, self.calib[t])([cand])[0]
             for t, s in (calibration or {}).items()}
      sel = candidates.as_selection(cand)
      rec.update(calibration=cal, mapped=candidates.is_mapped_output(self.cfg.model, cand),
                 kept=None if sel is None else sel.tolist(), candidate=candidates.to_json(cand))
      if key in self.scored:  # the same model scored under another name: its scores, not a second run
        rec.update(test=self.scored[key]["test"], text=self.scored[key]["text"], same_as=self.scored[key]["name"])
      else:
        rec["test"] = {t: {**self.single(keep, top_k, b)([cand])[0], "examples": int(len(b["tokens"]))}
                       for t, b in self.test.items()}
        rec["text"] = self.text_losses(cand, keep, top_k)
    _write(path, rec)
    self.scored.setdefault(key, rec)
    print(f"  {name}: test EM " + ", ".join(f"{t} {v['exact_match']:.3f}" for t, v in rec["test"].items()), flush=True)
    return rec

  def unpruned(self) -> dict:
    return json.loads((self.out / "evals" / f"unpruned_top{self.k0}.json").read_text())

  def run(self) -> None:
    a, t0 = self.a, time.time()
    if not (self.out / "study.json").is_file() or json.loads((self.out / "study.json").read_text()) != self.settings():
      _write(self.out / "study.json", self.settings())
    identity = candidates.identity(self.L, self.E)
    for top_k in dict.fromkeys([self.k0] + [k for _, k in self.keeps]):
      self.evaluate(f"unpruned_top{top_k}", identity, self.E, top_k, {t: None for t in self.tasks},
                    method="unpruned")
    for task in self.tasks:
      dev_pairs = fitness.split_pairs(task, "dev", a.dev)
      dev = fitness.task_batch(self.cfg, dev_pairs, self.calib[task]["tokens"].shape[1])  # calibration's width
      stats = None
      for keep, top_k in self.keeps:
        for s in a.seeds:
          self.search(task, keep, top_k, s, dev, len(dev_pairs))
        for m in ("frequency", "soft"):  # baselines.candidate's, from one pass of router statistics per task
          stats = stats or baselines.router_stats(self.params, self.cfg.model, self.calib[task])
          cand = candidates.selection(baselines.top_experts(stats[m], keep), self.E)
          self.evaluate(eep.eval_name(task, keep, m), cand, keep, top_k, {task: None}, task=task, method=m)
        for d in range(a.random_draws):  # the same draws for every task (seeded by the draw alone)
          cand = baselines.candidate("random", self.params, self.cfg.model, self.calib[task], keep, d)
          self.evaluate(eep.eval_name(task, keep, f"random{d}"), cand, keep, top_k, {task: None}, task=task,
                        method="random", draw=d)
    print(f"eep_study: done in {time.time() - t0:.0f} s; records in {self.out}")

  def search(self, task: str, keep: int, top_k: int, seed: int, dev: dict, n_dev: int) -> None:
    a, key = self.a, eep.search_name(task, keep, seed)
    rec_path = self.out / "searches" / f"{key}.json"
    ev = self.search_ev(keep, top_k, task)
    sc = search.SearchConfig(budget=a.budget, prune_evals=max(1, a.budget // 4),
                             init_pop=min(30, max(1, a.budget // 4)), seed=seed)
    archive_path = self.out / "archives" / f"{key}_archive.json"
    archive_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"task": task, "top_k": top_k, "calibration": a.calibration}
    resumed_at = len(json.loads(archive_path.read_text())["archive"]) if archive_path.is_file() else 0
    with timed({"task": task, "keep": keep, "top_k": top_k, "seed": seed, "resumed_at": resumed_at}) as rec:
      arch = search.run(ev.on(self.calib[task]), self.L, keep, self.E, sc, archive_path=archive_path, meta=meta,
                        progress=lambda n, b, f: print(f"  {key}: {n}/{b} best {f:.2f}", flush=True)
                        if n % 40 < sc.batch else None)
      if rec_path.is_file():  # finished before: its record holds the re-ranking
        rec = json.loads(rec_path.read_text())
      else:
        rr = search.rerank(arch, ev.on(dev), a.rerank, sc.metric, archive_path=archive_path,
                           info={"split": "dev", "examples": n_dev})
        calib_best = search.best(arch)["eval"]
        best_sel = search.best(arch, selections_only=True)
        rec.update(search=dataclasses.asdict(sc), calibration_examples=len(self.calib[task]["tokens"]),
                   evaluations=len(arch), curve=search.curve(arch), rerank=rr, calibration_best=calib_best,
                   chosen=rr["chosen"] if rr else calib_best, best_pruning=best_sel["eval"],
                   best_pruning_calibration={"exact_match": best_sel["exact_match"], "ce_loss": best_sel["ce_loss"]},
                   unpruned_calibration=self.unpruned()["calibration"][task])
    if not rec_path.is_file():
      _write(rec_path, rec)
    for method, idx in (("eep", rec["chosen"]), ("eep_calibration_best", rec["calibration_best"]),
                        ("best_pruning", rec["best_pruning"])):
      x = arch[idx]
      self.evaluate(eep.eval_name(task, keep, method, seed), x["cand"], keep, top_k,
                    {task: {"exact_match": x["exact_match"], "ce_loss": x["ce_loss"]}}, task=task, method=method,
                    seed=seed, eval=idx)

  def speed(self) -> None:
    """`moejax bench infer` of the EEP pick of each keep against the unpruned model at the same top-k, and the
    unpruned model at its own top-k against itself at each lower top-k (the top-k change alone)."""
    from moejax.bench import infer

    a, task, seed = self.a, self.a.speed_task or self.tasks[0], self.a.seeds[0]
    runs = self.out / "speed_runs"

    def run_dir(name: str, cand: dict, top_k: int) -> pathlib.Path:
      to = runs / name
      if not (to.is_dir() and checkpoint.step_numbers(to)):  # written by an earlier call: kept
        with runs_lib.claim(to):
          api.save(to, self.cfg, self.params, cand, top_k, self.step)
      return to

    def bench(name: str, label: str, a_dir: pathlib.Path, b_dir: pathlib.Path, **meta) -> None:
      path = self.out / "speed" / f"{name}.json"
      path.parent.mkdir(parents=True, exist_ok=True)
      infer.main([str(a_dir), "--vs", str(b_dir), "--batch", a.speed_batch, "--repeats", str(a.speed_repeats),
                  "--new-tokens", str(a.speed_new_tokens), "--json", str(path)])
      rec = json.loads(path.read_text())
      rec["comparison"] = {"label": label, "a": str(a_dir), "b": str(b_dir), "a_model": a_dir.name,
                           "b_model": b_dir.name, **meta}
      _write(path, rec)

    identity = candidates.identity(self.L, self.E)
    for keep, top_k in self.keeps:
      name = eep.eval_name(task, keep, "eep", seed)
      rec_path = self.out / "evals" / f"{name}.json"
      if not rec_path.is_file():
        raise config.ConfigError(f"--speed needs the study's EEP pick {rec_path}: run the study first")
      pick = run_dir(f"eep_{task}_k{keep}_s{seed}", candidates.from_json(json.loads(rec_path.read_text())
                                                                         ["candidate"]), top_k)
      ref = self.run_dir if top_k == self.k0 else run_dir(f"unpruned_top{top_k}", identity, top_k)
      bench(f"eep_k{keep}_vs_unpruned_top{top_k}", f"EEP {self.E}->{keep} top-{top_k} ({task}, seed {seed}) / "
            f"unpruned top-{top_k}", pick, ref, task=task, seed=seed, keep=keep, top_k=top_k)
      if top_k != self.k0:
        bench(f"unpruned_top{self.k0}_vs_top{top_k}", f"unpruned top-{top_k} / unpruned top-{self.k0} (the top-k "
              "change alone)", ref, self.run_dir, keep=self.E, top_k=top_k)


if __name__ == "__main__":
  sys.exit(main())
