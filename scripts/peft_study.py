"""The fine-tuning study (docs/results.md): a base pretrained here on Python's documentation (English prose),
fine-tuned on Python source code (CPython's own standard library, a shifted domain) by full fine-tuning, LoRA at
two ranks, and SpIEL-AG / SpIEL-MA at the same tunable-parameter counts as those LoRA runs; on a dense and an MoE
base. Reports eval loss on held-out stdlib files, step time, and adapter + optimizer bytes; writes a table
(results.md) and loss curves (PNG).

  python scripts/peft_study.py --out runs/peft_study [--pretrain-steps 300] [--steps 150] [--ranks 2 8]

The fine-tuning data set `peft_stdlib` is built here, offline, from the running interpreter's `Lib/` (top-level
modules and packages, test packages excluded, capped at --max-bytes; ~5% of bytes held out by file-name hash).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pathlib
import sysconfig
import time

import numpy as np
import tensorflow_datasets as tfds

from moejax import checkpoint, config, metrics, registry, report, train
from moejax.data import builders
from moejax.peft import trainer as peft_trainer

MAX_BYTES = 3_000_000


def stdlib_files(max_bytes: int) -> list[tuple[str, str]]:
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  out, total = [], 0
  for f in sorted(root.rglob("*.py")):
    rel = f.relative_to(root).as_posix()
    if any(part.startswith(("test", "idle_test", "site-packages", "lib2to3")) or part == "tests"
           for part in rel.split("/")[:-1]) or rel.startswith("test"):
      continue
    text = f.read_text(encoding="utf-8", errors="replace")
    if total + len(text) > max_bytes:
      continue
    out.append((rel, text))
    total += len(text)
  return out


def _held(name: str) -> bool:
  return int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF < 0.05


class PeftStdlib(builders.BundledBuilder):
  """CPython's standard-library source files, one document per file (the study's fine-tuning domain)."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "title": tfds.features.Text()})
    return builders.info(self, features, "CPython standard library source (Lib/, tests excluded).")

  def _split_generators(self, dl_manager):
    del dl_manager
    files = stdlib_files(int(os.environ.get("PEFT_STUDY_MAX_BYTES", MAX_BYTES)))
    return {"train": self._generate_examples([f for f in files if not _held(f[0])]),
            "validation": self._generate_examples([f for f in files if _held(f[0])])}

  def _generate_examples(self, files):
    for name, text in files:
      yield name, {"text": text, "title": name}


def _rows(d):
  return metrics.read_jsonl(d)


def _step_time(rows, cfg) -> float:
  rates = [r["throughput/tokens_per_s"] for r in rows if r.get("split") == "train"
           and np.isfinite(r.get("throughput/tokens_per_s", float("nan")))]
  return cfg.data.batch_size * cfg.data.seq_len / float(np.median(rates)) if rates else float("nan")


def pretrain(name: str, out: pathlib.Path, steps: int, overrides: list[str]) -> pathlib.Path:
  d = out / f"base_{name}"
  if not (d / "result.json").exists():
    cfg = registry.get(name, [*overrides, f"train.steps={steps}", f"train.eval_every={steps}",
                              f"train.checkpoint_every={steps}"])
    train.train(cfg, d, progress=False)
  return d


def run(name: str, cfg: config.ExperimentConfig, out: pathlib.Path, full_from: pathlib.Path | None = None) -> dict:
  d = out / name
  if not (d / "result.json").exists():
    if full_from is not None:  # full fine-tuning: the base's params as this run's params-only step 0
      s = train.setup(cfg)
      params, _ = checkpoint.load_params(full_from, s.abstract_state["params"])
      d.mkdir(parents=True, exist_ok=True)
      m = checkpoint.Manager(d)
      m.save(0, train.params_only_state(s, params, 0), cfg, force=True)
      m.close()
    t0 = time.time()
    train.train(cfg, d, progress=False)
    (d / "wall_s.txt").write_text(f"{time.time() - t0:.1f}")
  s = train.setup(cfg)
  rows = _rows(d)
  ev = [r for r in rows if r["split"] == "eval"]
  if s.extra is not None:  # a fine-tune
    tunable, mem = peft_trainer.tunable_count(s), peft_trainer.state_bytes(s)
  else:
    import jax

    leaves = jax.tree.leaves(s.abstract_state["params"])
    tunable = sum(int(x.size) for x in leaves)
    opt = jax.tree.leaves(s.abstract_state["opt_state"])
    mem = {"adapter_bytes": 0, "optimizer_bytes": sum(int(x.size) * x.dtype.itemsize for x in opt),
           "selection_bytes": 0}
  return {"run": name, "method": cfg.peft.method if cfg.peft.method != "none" else "full",
          "tunable": tunable, "eval_ce": ev[-1]["ce_loss"], "step_ms": 1000 * _step_time(rows, cfg),
          "wall_s": float((d / "wall_s.txt").read_text()), **mem}


def main(argv=None) -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", default="runs/peft_study")
  ap.add_argument("--pretrain-steps", type=int, default=300)
  ap.add_argument("--steps", type=int, default=150)
  ap.add_argument("--ranks", type=int, nargs=2, default=[2, 8])
  ap.add_argument("--bases", nargs="+", default=["lm_dense_tiny", "lm_moe_tiny"])
  ap.add_argument("--max-bytes", type=int, default=MAX_BYTES)
  ap.add_argument("--overrides", nargs="*", default=[], help="a.b=v applied to every run (pretraining included)")
  ap.add_argument("--lr", type=float, nargs=4, default=[1e-3, 3e-3, 3e-3, 1e-2],
                  metavar=("FULL", "LORA", "SPIEL_AG", "SPIEL_MA"))
  args = ap.parse_args(argv)
  out = pathlib.Path(args.out)
  os.environ["PEFT_STUDY_MAX_BYTES"] = str(args.max_bytes)
  data_dir = str((out / "tfds").resolve())
  PeftStdlib(data_dir=data_dir, file_format=builders.FILE_FORMAT).download_and_prepare()
  ft_data = ["data.dataset=peft_stdlib", f"data.tfds_dir={data_dir}"]
  common = [*args.overrides, f"train.steps={args.steps}", f"train.eval_every={max(args.steps // 3, 1)}", "train.eval_steps=8",
            f"train.checkpoint_every={args.steps}", "optim.warmup_steps=10", "optim.weight_decay=0.0",
            "train.log_every=10", *ft_data]
  lr_full, lr_lora, lr_ag, lr_ma = args.lr
  results = []
  for base_name in args.bases:
    base = pretrain(base_name, out, args.pretrain_steps, args.overrides)
    tag = "moe" if "moe" in base_name else "dense"
    get = lambda *o, b=base_name: registry.get(b, [*common, *o])
    results.append(run(f"{tag}_full", get(f"optim.lr={lr_full}"), out, full_from=base))
    for r in args.ranks:
      pe = [f"init.peft_from={base}"]
      results.append(run(f"{tag}_lora_r{r}", get("peft.method=lora", f"peft.lora_rank={r}",
                                                 f"peft.lora_alpha={2.0 * r}", f"optim.lr={lr_lora}", *pe), out))
      results.append(run(f"{tag}_spiel_ag_r{r}", get("peft.method=spiel_ag", f"peft.match_lora_rank={r}",
                                                     f"optim.lr={lr_ag}", *pe), out))
      results.append(run(f"{tag}_spiel_ma_r{r}", get("peft.method=spiel_ma", f"peft.match_lora_rank={r}",
                                                     f"optim.lr={lr_ma}", *pe), out))
    base_eval = train.evaluate(base, registry.get(base_name, common))
    results.append({"run": f"{tag}_base (no fine-tuning)", "method": "none", "tunable": 0,
                    "eval_ce": base_eval["ce_loss"], "step_ms": float("nan"), "wall_s": 0.0, "adapter_bytes": 0,
                    "optimizer_bytes": 0, "selection_bytes": 0})
    runs = {r["run"]: _rows(out / r["run"]) for r in results if r and r["run"].startswith(tag + "_") and
            (out / r["run"]).is_dir()}
    report.loss_curves(runs, out / f"peft_study_{tag}.png", title=f"fine-tuning on stdlib source, {tag} base")
  results = [r for r in results if r]
  cols = ["run", "method", "tunable", "eval_ce", "step_ms", "adapter_bytes", "optimizer_bytes", "selection_bytes",
          "wall_s"]
  table = report.markdown_table(results, cols)
  (out / "results.md").write_text(table + "\n")
  (out / "results.json").write_text(json.dumps(results, indent=2))
  print(table)


if __name__ == "__main__":
  main()
