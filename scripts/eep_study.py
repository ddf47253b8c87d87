"""The EEP study of docs/results.md ("Expert pruning"): a trained multi-domain MoE pruned 8 -> 4 and 8 -> 2
experts for two tasks; EEP (search on the calibration split, its best `--rerank` [20] re-ranked on the dev split,
as the paper does) against the calibration-best of the same search, the baselines (random subsets, most
frequently routed, largest summed router probability, best phase-1 pruning) and the unpruned model, scored on
the held-out TEST split of the task (500 examples), the other task's test split and the text domains' loss.

  python scripts/eep_study.py --run runs/lm_moe_mix_eep --out runs/eep_study --budget 400

Resumable: each search's archive is `OUT/<task>_k<keep>_archive.json` (the re-ranking's record in it); rerun the
same command to continue (a row finished before re-ranking existed is redone from its finished archive: only
the re-ranking and the evaluations run again). Writes OUT/results.json, OUT/table.md and
docs/img/eep_search_curves.png (--png).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import sys
import time
import warnings

import jax
import numpy as np

from moejax import checkpoint, sharding
from moejax.models import transformer
from moejax.prune import baselines, candidates, fitness, search
from moejax.tasks import lm_eval


def load(run: pathlib.Path):
  cfg = checkpoint.read_config(run)
  specs = transformer.specs(cfg.model)
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev), specs,
                          is_leaf=sharding.is_spec)
  params, _ = checkpoint.load_params(run, abstract)
  return cfg, jax.device_get(params)


def text_losses(params, mcfg, cfg, mesh) -> dict[str, float]:
  exp = dataclasses.replace(cfg, model=mcfg)
  return {name: lm_eval.evaluate_text(params, exp, mesh, name)["ce_loss"]
          for name, _ in cfg.data.mixture if name != "moejax_tasks"}


def main() -> int:
  ap = argparse.ArgumentParser()
  ap.add_argument("--run", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--tasks", default="lookup,reverse")
  ap.add_argument("--keeps", default="4:2,2:1", help="keep:top_k pairs")
  ap.add_argument("--budget", type=int, default=400)
  ap.add_argument("--calibration", type=int, default=250)
  ap.add_argument("--rerank", type=int, default=20, help="the best N by calibration re-ranked on dev [20; 0: off]")
  ap.add_argument("--dev", type=int, default=250, help="dev examples per task for the re-ranking [250: all]")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--random-seeds", type=int, default=3)
  ap.add_argument("--png", default="docs/img/eep_search_curves.png")
  args = ap.parse_args()
  warnings.filterwarnings("ignore", message="moe.top_k=1 with moe.renormalize")
  run, out = pathlib.Path(args.run), pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  cfg, params = load(run)
  mesh = sharding.make_mesh(cfg.mesh)
  task_names = args.tasks.split(",")
  keeps = [tuple(int(v) for v in kv.split(":")) for kv in args.keeps.split(",")]
  E, L = cfg.model.moe.num_experts, len(candidates.moe_layers(cfg.model))
  test = {t: fitness.task_batch(cfg, fitness.split_pairs(t, "test")) for t in task_names}
  results = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
  t_start = time.time()
  if "unpruned" not in results:
    ev = {t: fitness.Evaluator(params, cfg, keep=E, top_k=cfg.model.moe.top_k, batch=test[t]) for t in task_names}
    results["unpruned"] = {"experts": E, "top_k": cfg.model.moe.top_k, "test": {t: ev[t].plain() for t in task_names},
                           "text": text_losses(params, cfg.model, cfg, mesh)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
  print("unpruned", results["unpruned"], flush=True)
  for task in task_names:
    calib = fitness.task_batch(cfg, fitness.split_pairs(task, "calibration", args.calibration))
    dev_pairs = fitness.split_pairs(task, "dev", args.dev)
    for keep, top_k in keeps:
      key = f"{task}_k{keep}"
      if key in results and results[key].get("done") and (not args.rerank or "rerank" in results[key]):
        continue
      t0 = time.time()
      cal_ev = fitness.Evaluator(params, cfg, keep=keep, top_k=top_k, batch=calib)
      sc = search.SearchConfig(budget=args.budget, prune_evals=max(1, args.budget // 4),
                               init_pop=min(30, max(1, args.budget // 4)), seed=args.seed)
      arch = search.run(cal_ev, L, keep, E, sc, archive_path=out / f"{key}_archive.json",
                        meta={"task": task, "top_k": top_k},
                        progress=lambda n, b, f, key=key: print(f"  {key}: {n}/{b} best {f:.2f}", flush=True)
                        if n % 20 < 4 else None)
      # a row redone only to re-rank resumed a finished archive: its search time is the first run's
      t_search = results.get(key, {}).get("search_seconds", round(time.time() - t0, 1))
      # padded to the calibration batch's width: the same shape reuses the fitness's compilation
      dev = fitness.task_batch(cfg, dev_pairs, calib["tokens"].shape[1]) if args.rerank else None
      rerank = search.rerank(arch, cal_ev.on(dev) if args.rerank else None, args.rerank, sc.metric,
                             archive_path=out / f"{key}_archive.json",
                             info={"split": "dev", "examples": len(dev_pairs)})
      methods = {"eep": arch[rerank["chosen"]] if rerank else search.best(arch),
                 "best_pruning": search.best(arch, selections_only=True)}
      if rerank:
        methods["eep_calibration_best"] = search.best(arch)
      for m in ("frequency", "soft"):
        methods[m] = {"cand": baselines.candidate(m, params, cfg.model, calib, keep, 0)}
      for s in range(args.random_seeds):
        methods[f"random{s}"] = {"cand": baselines.candidate("random", params, cfg.model, calib, keep, s)}
      row = {"keep": keep, "top_k": top_k, "search_seconds": t_search, "curve": search.curve(arch),
             "evaluations": len(arch), "unpruned_calibration": cal_ev.plain(), "methods": {}}
      if rerank:
        row["rerank"] = rerank
      test_ev = {t: fitness.Evaluator(params, cfg, keep=keep, top_k=top_k, batch=test[t]) for t in task_names}
      for name, c in methods.items():
        cand = c["cand"]
        cal = cal_ev([cand])[0]
        r = {"calibration": cal, "test": {t: test_ev[t]([cand])[0] for t in task_names},
             "mapped": candidates.is_mapped_output(cfg.model, cand),
             "kept": None if candidates.as_selection(cand) is None else candidates.as_selection(cand).tolist()}
        if not name.startswith("random") or name == "random0":
          mapped = r["mapped"]
          p = candidates.apply(params, cfg.model, cand, mapped=mapped)
          r["text"] = text_losses(p, candidates.pruned_config(cfg.model, keep, top_k, mapped), cfg, mesh)
        row["methods"][name] = r
        print(f"  {key} {name}: {r['test']}", flush=True)
      row["done"] = True
      results[key] = row
      (out / "results.json").write_text(json.dumps(results, indent=1))
  results["wall_seconds_this_call"] = round(time.time() - t_start, 1)
  (out / "results.json").write_text(json.dumps(results, indent=1))
  write_table(results, task_names, keeps, out / "table.md")
  plot(results, task_names, keeps, args.png)
  return 0


def write_table(results, task_names, keeps, path) -> None:
  texts = list(results["unpruned"]["text"])
  head = "| target task | experts (top-k) | method | " + " | ".join(f"test EM {t}" for t in task_names) + " | " + \
         " | ".join(f"{n} loss" for n in texts) + " |"
  lines = [head, "|" + "---|" * (3 + len(task_names) + len(texts))]
  u = results["unpruned"]
  lines.append(f"| - | {u['experts']} ({u['top_k']}) | unpruned | " + " | ".join(f"{u['test'][t]['exact_match']:.3f}" for t in task_names)
               + " | " + " | ".join(f"{u['text'][n]:.3f}" for n in texts) + " |")
  for task in task_names:
    for keep, top_k in keeps:
      row = results.get(f"{task}_k{keep}")
      if not row:
        continue
      ms = row["methods"]
      rnd = [v for k, v in ms.items() if k.startswith("random")]
      # a row from before the re-ranking has no "rerank": its EEP is the calibration-best
      eep = [("EEP", ms["eep"])] if "rerank" not in row else [
        (f"EEP (best on dev of the top {row['rerank']['n']})", ms["eep"]),
        ("EEP calibration-best (no re-ranking)", ms["eep_calibration_best"])]
      order = eep + [("best phase-1 pruning", ms["best_pruning"]), ("frequency", ms["frequency"]),
                     ("soft activation", ms["soft"])]
      for label, r in order:
        lines.append(f"| {task} | {keep} ({top_k}) | {label} | "
                     + " | ".join(f"{r['test'][t]['exact_match']:.3f}" for t in task_names) + " | "
                     + " | ".join(f"{r['text'][n]:.3f}" for n in texts) + " |")
      # only draw 0 is evaluated on the text domains (the script skips the others' text evals to save time)
      lines.append(f"| {task} | {keep} ({top_k}) | random (EM: mean of {len(rnd)} draws; text: draw 0 only) | "
                   + " | ".join(f"{np.mean([r['test'][t]['exact_match'] for r in rnd]):.3f}" for t in task_names)
                   + " | " + " | ".join(f"{rnd[0]['text'][n]:.3f}" for n in texts) + " |")
  pathlib.Path(path).write_text("\n".join(lines) + "\n")
  print("\n".join(lines))


def plot(results, task_names, keeps, png) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(7, 4))
  for task in task_names:
    for keep, top_k in keeps:
      row = results.get(f"{task}_k{keep}")
      if not row:
        continue
      line, = ax.plot(np.arange(1, len(row["curve"]) + 1), row["curve"], label=f"{task}, 8->{keep} top-{top_k}")
      ax.axhline(100 * row["unpruned_calibration"]["exact_match"], color=line.get_color(), ls=":", lw=1)
  ax.axvline(max(1, len(row["curve"]) // 4), color="gray", ls="--", lw=1)
  ax.set_xlabel("evaluations (dashed: pruning -> merging phase)")
  ax.set_ylabel("best calibration exact match (%)")
  ax.set_title("EEP search curves (dotted: the unpruned model)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  pathlib.Path(png).parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(png, dpi=110)
  print("wrote", png)


if __name__ == "__main__":
  sys.exit(main())
