"""The fine-tuning study (docs/results.md, "Fine-tuning a frozen base"): LoRA vs SpIEL-AG vs SpIEL-MA vs full
fine-tuning, each at its own tuned learning rate, on a dense and an MoE base, three seeds.

  python scripts/peft_study.py [--out runs/peft_study] [--seeds 0 1 2] [--ranks 2 8] [--steps 220]
  python scripts/peft_study.py --write-docs [--record results/studies/peft]   (tables + figure from the record)

What runs, per base (pretrained here on Python's documentation, `moejax_pydoc`):
  1. the LR grid: every arm (full; LoRA, SpIEL-AG, SpIEL-MA at each rank, SpIEL matched to the LoRA's tunable count
     by `peft.match_lora_rank`) at every learning rate of its method's grid (`LRS`, --lr), seed 0, fine-tuned on
     CPython's standard library (`peft_stdlib`, built here offline) and scored on its dev split; where the best
     rate is an end of the grid, the next rate on the 1-3-10 ladder beyond it is tried, one at a time, up to
     EXTEND (2) past either end (`extension`), so that no choice is an untested edge unless the ladder ran out;
  2. each arm's chosen learning rate (the lowest dev loss at seed 0) at the other seeds;
  3. (--task) the same arms at the smallest rank, at their chosen learning rates, fine-tuned on one synthetic
     exact-match task instead (`moejax_tasks`, default lookup) and scored by exact match on its 500 test examples.
Each stdlib run is scored on the held-out test files (never read by training or by the LR choice). A seed sets
train.seed, data.shuffle_seed and peft.seed. SpIEL keeps the reference code's schedule (reselect every 20 steps after
5 of statistics, drop 100% then 0.2 (1 - t/T)); the default 220 steps make 11 reselections.

Resumable: each finished run leaves a JSON record (OUT/record/<base>/<target>/<arm>/lr<lr>/s<seed>.json: losses,
exact match, tunable count, adapter / optimizer / selection bytes, median step time, wall and CPU seconds, and the
machine, load and commit it ran with) and is skipped on the next invocation; a run stopped part-way (SIGTERM, Ctrl-C,
a crash) resumes from its newest checkpoint (`moejax train`, a child process niced like the study). OUT/record is
what results/studies/peft keeps; `--write-docs` reads only that.

The data set `peft_stdlib` (the running interpreter's `Lib/`, test packages excluded, capped at --max-bytes) is split
by file-name hash: test = the 5% of files it held out before the dev split existed (the same files), dev = the next
5%, train = the rest.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import pathlib
import resource
import shutil
import sys
import sysconfig
import time

import numpy as np
import tensorflow_datasets as tfds

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))  # studylib, beside this script

from studylib import execute, tables  # noqa: E402
from studylib.grids import EXTEND, next_rate  # noqa: E402

from moejax import checkpoint, config, metrics, provenance, registry, report, train  # noqa: E402
from moejax.data import builders  # noqa: E402
from moejax.peft import trainer as peft_trainer  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "results.md"
GENERATOR = "scripts/peft_study.py --write-docs"
BENCH = ROOT / "results" / "bench"  # `bench peft` records (peft_*.json): the step-time claim's evidence
STEP_COST_BOUND = 1.3  # "about LoRA's step cost": at most this many times LoRA's step time (issue 27's target)
MAX_BYTES = 3_000_000
# The bases: lm_dense_tiny / lm_moe_tiny shrunk (2 layers, d 64), with byte_eos tokens so that the task target's
# answers end in an EOS the model can be scored on.
SMALL = ("model.d_model=64", "model.d_ff=256", "model.num_layers=2", "data.seq_len=64", "model.max_seq_len=64",
         "model.vocab_size=258", "data.tokenizer=byte_eos")
# Per method, >= 3 rates spanning the earlier runs' useful range (LoRA and SpIEL-AG share one AdamW grid; SM3's
# AdaGrad-like shrinking step wants larger rates; full fine-tuning moves every weight, so smaller ones).
LRS = {"full": (3e-4, 1e-3, 3e-3), "lora": (3e-4, 1e-3, 3e-3, 1e-2), "spiel_ag": (3e-4, 1e-3, 3e-3, 1e-2),
       "spiel_ma": (3e-3, 1e-2, 3e-2, 1e-1)}
METHODS = ("lora", "spiel_ag", "spiel_ma")
DEV_EVAL_STEPS, TEST_EVAL_STEPS = 32, 64  # batches of 16 x 64 bytes: 32 KB of dev files, 64 KB of test files


# ----------------------------------------------------------------------------------------------------------
# The data set
# ----------------------------------------------------------------------------------------------------------


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


def split_of(name: str) -> str:
  """test: the files the study held out before it had a dev split (hash fraction < 0.05, unchanged); dev: the next
  5% (taken from what was train)."""
  u = int(hashlib.sha256(name.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
  return "test" if u < 0.05 else "validation" if u < 0.10 else "train"


class PeftStdlib(builders.BundledBuilder):
  """CPython's standard-library source files, one document per file (the study's fine-tuning domain)."""

  VERSION = tfds.core.Version("2.0.0")  # 2.0.0: a dev split (`validation`) beside `test`

  def _info(self):
    features = tfds.features.FeaturesDict({"text": tfds.features.Text(), "title": tfds.features.Text()})
    return builders.info(self, features, "CPython standard library source (Lib/, tests excluded).")

  def _split_generators(self, dl_manager):
    del dl_manager
    files = stdlib_files(int(os.environ.get("PEFT_STUDY_MAX_BYTES", MAX_BYTES)))
    return {s: self._generate_examples([f for f in files if split_of(f[0]) == s])
            for s in ("train", "validation", "test")}

  def _generate_examples(self, files):
    for name, text in files:
      yield name, {"text": text, "title": name}


# ----------------------------------------------------------------------------------------------------------
# The plan
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Run:
  base: str  # the base's experiment (lm_dense_tiny, lm_moe_tiny)
  target: str  # stdlib | task
  arm: str  # full | lora_r2 | spiel_ag_r2 | ...
  lr: float
  seed: int

  @property
  def method(self) -> str:
    return method_of(self.arm)

  @property
  def rank(self) -> int:
    return 0 if self.arm == "full" else int(self.arm.rsplit("_r", 1)[1])

  @property
  def key(self) -> str:
    return f"{self.base}/{self.target}/{self.arm}/lr{self.lr:g}/s{self.seed}"


def method_of(arm: str) -> str:
  return "full" if arm == "full" else arm.rsplit("_r", 1)[0]


def arms(ranks: list[int]) -> list[str]:
  return ["full", *(f"{m}_r{r}" for r in ranks for m in METHODS)]


def method_overrides(r: Run, base_dir: pathlib.Path) -> list[str]:
  ov = [f"optim.lr={r.lr}", f"train.seed={r.seed}", f"data.shuffle_seed={r.seed}"]
  if r.method == "full":
    return ov
  ov += [f"peft.method={r.method}", f"peft.seed={r.seed}", f"init.peft_from={base_dir.resolve()}"]
  if r.method == "lora":  # alpha = 2r: peft's default ratio (16 at rank 8), so the update's scale is rank-free
    return ov + [f"peft.lora_rank={r.rank}", f"peft.lora_alpha={2.0 * r.rank}"]
  return ov + [f"peft.match_lora_rank={r.rank}"]


def target_overrides(target: str, a: argparse.Namespace, data_dir: str) -> list[str]:
  if target == "stdlib":
    return ["data.dataset=peft_stdlib", f"data.tfds_dir={data_dir}", "data.eval_split=validation",
            f"train.eval_steps={a.dev_eval_steps}"]
  # the task source's eval split is its 500-example test split (builders.DEFAULT_EVAL_SPLIT); scored once, at the end
  return ["data.mixture=[('moejax_tasks', 1.0)]", f"data.tasks=({a.task!r},)",
          f"data.task_eval_examples={a.task_examples}", "train.eval_steps=1"]


def config_for(r: Run, a: argparse.Namespace, base_dir: pathlib.Path, data_dir: str) -> list[str]:
  steps = a.steps
  return [*a.overrides, f"train.steps={steps}", f"train.eval_every={steps}", f"train.checkpoint_every={a.ckpt_every}",
          "train.keep_checkpoints=1", "train.log_every=10", "optim.warmup_steps=10", "optim.weight_decay=0.0",
          f"optim.b2={a.b2}", *target_overrides(r.target, a, data_dir), *method_overrides(r, base_dir)]


# ----------------------------------------------------------------------------------------------------------
# Running one run
# ----------------------------------------------------------------------------------------------------------


def last_eval(d: pathlib.Path) -> dict:
  rows = [r for r in metrics.read_jsonl(d) if r.get("split") == "eval"] if (d / "metrics.jsonl").exists() else []
  return rows[-1] if rows else {}


def step_ms(d: pathlib.Path, cfg: config.ExperimentConfig) -> float:
  """Median over the logged rows (the first, with the compile, excluded) of the train step's wall time."""
  rates = [r["throughput/tokens_per_s"] for r in metrics.read_jsonl(d) if r.get("split") == "train"
           and r["step"] > 1 and np.isfinite(r.get("throughput/tokens_per_s", float("nan")))]
  return 1000 * cfg.data.batch_size * cfg.data.seq_len / float(np.median(rates)) if rates else float("nan")


def sizes(cfg: config.ExperimentConfig) -> dict:
  """Tunable params and the bytes a run keeps beside the base (full fine-tuning: its optimizer's moments)."""
  import jax

  s = train.setup(cfg)
  if s.extra is not None:
    return {"tunable": peft_trainer.tunable_count(s), **peft_trainer.state_bytes(s)}
  nbytes = lambda t: sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(t))
  return {"tunable": sum(int(x.size) for x in jax.tree.leaves(s.abstract_state["params"])), "adapter_bytes": 0,
          "optimizer_bytes": nbytes(s.abstract_state["opt_state"]), "selection_bytes": 0}


def _cpu_s() -> float:
  u = resource.getrusage(resource.RUSAGE_SELF)
  return u.ru_utime + u.ru_stime


def train_run(experiment: str, overrides: list[str], d: pathlib.Path, in_process: bool) -> int:
  """Train (or resume) the run in `d` and return the trainer's exit status; its wall and CPU seconds are added to
  d/timing.json, so a run stopped part-way and resumed is charged for both parts. A stop by SIGTERM / Ctrl-C leaves
  a checkpoint and exits the study."""
  t0, c0 = time.time(), _cpu_s()
  if in_process:  # the tests' toy twin: no child to start
    rc = 0
    try:
      train.train(registry.get(experiment, overrides), d, progress=False)
    except FloatingPointError:  # too many non-finite steps in a row: what a child reports as exit status 1
      rc = 1
    wall, cpu, stopped = time.time() - t0, _cpu_s() - c0, 0
  else:
    cmd = [sys.executable, "-m", "moejax.cli", "train", experiment, *overrides, "--workdir", str(d)]
    rc, wall, cpu, stopped = execute.train_child(cmd)
  d.mkdir(parents=True, exist_ok=True)
  prev = json.loads((d / "timing.json").read_text()) if (d / "timing.json").exists() else {"wall_s": 0, "cpu_s": 0}
  total = {"wall_s": prev["wall_s"] + wall, "cpu_s": prev["cpu_s"] + cpu}
  (d / "timing.json").write_text(json.dumps(total))
  if stopped:
    print(f"peft_study: stopped; {d} resumes from its checkpoint on the next invocation", flush=True)
    raise SystemExit(128 + stopped)
  return rc


def write_json(path: pathlib.Path, data: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
  os.replace(tmp, path)


def read_json(path: pathlib.Path) -> dict | None:
  return json.loads(path.read_text()) if path.exists() else None


def pretrain(base: str, a: argparse.Namespace, out: pathlib.Path) -> pathlib.Path:
  d = out / "runs" / base / "pretrain"
  steps = a.pretrain_steps
  if last_eval(d).get("step", -1) < steps:
    rc = train_run(base, [*a.overrides, f"train.steps={steps}", f"train.eval_every={steps}",
                     f"train.checkpoint_every={min(a.ckpt_every, steps)}", "train.log_every=50"], d, a.in_process)
    if rc:
      raise SystemExit(f"peft_study: pretraining {d} failed (exit {rc})")
  return d


def base_record(base: str, base_dir: pathlib.Path, a: argparse.Namespace, data_dir: str,
                record: pathlib.Path) -> dict:
  """The base, not fine-tuned, on what the fine-tunes are scored on: stdlib dev and test loss, task exact match."""
  path = record / base / "base.json"
  rec = read_json(path)
  if rec is not None:
    return rec
  common = [*a.overrides, "data.shuffle_seed=0"]
  stdlib = [*common, *target_overrides("stdlib", a, data_dir)]
  rec = {"kind": "base", "base": base, "pretrain_steps": a.pretrain_steps,
         "dev_ce": train.evaluate(base_dir, registry.get(base, stdlib))["ce_loss"],
         "test_ce": train.evaluate(base_dir, registry.get(base, [*stdlib, "data.eval_split=test",
                                                                 f"train.eval_steps={a.test_eval_steps}"]))["ce_loss"],
         "timing": read_json(base_dir / "timing.json"), "provenance": provenance.record(ROOT)}
  if a.task:
    ev = train.evaluate(base_dir, registry.get(base, [*common, *target_overrides("task", a, data_dir)]))
    rec["exact_match"], rec["task_ce"] = ev[f"moejax_tasks/{a.task}/exact_match"], ev["moejax_tasks/ce_loss"]
  write_json(path, _floats(rec))
  return rec


def _floats(x):
  """JSON-ready: numpy / jax scalars as floats."""
  if isinstance(x, dict):
    return {k: _floats(v) for k, v in x.items()}
  if isinstance(x, list | tuple):
    return [_floats(v) for v in x]
  return x if isinstance(x, str | int | bool | type(None)) else float(x)


def run(r: Run, a: argparse.Namespace, base_dir: pathlib.Path, data_dir: str, out: pathlib.Path,
        record: pathlib.Path) -> dict:
  """One run's record: read if it exists, otherwise trained (or resumed), scored and written."""
  path = record / f"{r.key}.json"
  rec = read_json(path)
  if rec is not None:
    return rec
  d = out / "runs" / r.key
  overrides = config_for(r, a, base_dir, data_dir)
  cfg = registry.get(r.base, overrides)
  start = provenance.record(ROOT)
  if last_eval(d).get("step", -1) >= a.steps and not checkpoint.step_numbers(d):
    shutil.rmtree(d)  # finished but its record and checkpoint are gone: nothing to score, so train it again
  if last_eval(d).get("step", -1) < a.steps:
    print(f"peft_study: {r.key}", flush=True)
    if r.method == "full" and not checkpoint.step_numbers(d):  # the base's params as a params-only step 0
      s = train.setup(cfg)
      params, _ = checkpoint.load_params(base_dir, s.abstract_state["params"])
      m = checkpoint.Manager(d)
      m.save(0, train.params_only_state(s, params, 0), cfg, force=True)
      m.close()
    rc = train_run(r.base, overrides, d, a.in_process)
    if rc:  # a learning rate that diverges is a grid result, not the end of the study: recorded as failed
      print(f"peft_study: {r.key} failed (exit {rc}; its log is above); recorded as failed, the study goes on",
            flush=True)
  timing = read_json(d / "timing.json") or {"wall_s": float("nan"), "cpu_s": float("nan")}
  ev = last_eval(d)
  rec = {"kind": "run", **dataclasses.asdict(r), "method": r.method, "rank": r.rank, "steps": a.steps,
         "overrides": overrides, **sizes(cfg), "step_ms": step_ms(d, cfg), **timing,
         "provenance": provenance.finished(start)}
  if ev.get("step", -1) < a.steps:
    rec.update(failed=True, dev_ce=None, test_ce=None, exact_match=None)
  elif r.target == "stdlib":
    t0 = time.time()
    # the same test windows for every run and the base (pinned: the eval iterator takes the shuffle seed)
    test = train.evaluate(d, registry.get(r.base, [*overrides, "data.eval_split=test", "data.shuffle_seed=0",
                                                   f"train.eval_steps={a.test_eval_steps}"]))
    rec.update(dev_ce=ev["ce_loss"], test_ce=test["ce_loss"], test_eval_s=time.time() - t0)
  else:
    rec.update(exact_match=ev[f"moejax_tasks/{a.task}/exact_match"], task_ce=ev["moejax_tasks/ce_loss"])
  write_json(path, _floats(rec))
  if not a.keep_checkpoints:  # scored and recorded: the checkpoints are not needed again
    shutil.rmtree(d / "checkpoints", ignore_errors=True)
  return rec


def chosen_lr(recs: list[dict], base: str, arm: str) -> float | None:
  """The rate with the lowest dev loss at seed 0 (ties: the smaller rate); None before the grid is complete."""
  grid = [x for x in recs if (x["base"], x["target"], x["arm"], x["seed"]) == (base, "stdlib", arm, 0)
          and x.get("dev_ce") is not None]
  return min(grid, key=lambda x: (x["dev_ce"], x["lr"]))["lr"] if grid else None


def extension(recs: list[dict], base: str, arm: str, grid: tuple[float, ...]) -> float | None:
  """The next rate to try for `arm` at seed 0 when its choice sits on an end of what was tried (failed rates
  count as tried: a rate past one that diverged is not tried), at most EXTEND beyond either end of `grid`;
  None when the choice is interior, or the ends are exhausted, or nothing succeeded."""
  tried = sorted({x["lr"] for x in recs if (x["base"], x["target"], x["arm"], x["seed"]) == (base, "stdlib", arm, 0)})
  lr = chosen_lr(recs, base, arm)
  if lr is None or len(tried) < 2:
    return None
  if lr == tried[-1] and sum(v > max(grid) for v in tried) < EXTEND:
    return next_rate(lr, up=True)
  if lr == tried[0] and sum(v < min(grid) for v in tried) < EXTEND:
    return next_rate(lr, up=False)
  return None


def study(a: argparse.Namespace) -> list[dict]:
  out = pathlib.Path(a.out)
  record = out / "record"
  os.environ["PEFT_STUDY_MAX_BYTES"] = str(a.max_bytes)
  data_dir = str((out / "tfds").resolve())
  PeftStdlib(data_dir=data_dir, file_format=builders.FILE_FORMAT).download_and_prepare()
  t0, start = time.time(), provenance.record(ROOT)
  recs = []
  try:
    for base in a.bases:
      base_dir = pretrain(base, a, out)
      base_record(base, base_dir, a, data_dir, record)
      names = [x for x in arms(a.ranks) if not a.arms or x in a.arms]
      for arm in names:  # 1. the LR grid at seed 0, scored on the dev split, extended where the choice is an end
        grid = a.lr[method_of(arm)]
        recs += [run(Run(base, "stdlib", arm, lr, 0), a, base_dir, data_dir, out, record) for lr in grid]
        while (lr := extension(recs, base, arm, grid)) is not None:
          print(f"peft_study: {base} {arm}: the best rate is an end of the grid; trying {lr:g}", flush=True)
          recs.append(run(Run(base, "stdlib", arm, lr, 0), a, base_dir, data_dir, out, record))
      for arm in names:  # 2. the chosen rate at the other seeds
        if (lr := chosen_lr(recs, base, arm)) is None:
          print(f"peft_study: every rate of {base} {arm} failed; no seeds, no task run for it", flush=True)
          continue
        recs += [run(Run(base, "stdlib", arm, lr, s), a, base_dir, data_dir, out, record) for s in a.seeds if s]
      if a.task:  # 3. exact match: the smallest budget, each arm at its stdlib-chosen rate
        for arm in [x for x in names if x == "full" or x.endswith(f"_r{min(a.ranks)}")]:
          if (lr := chosen_lr(recs, base, arm)) is None:
            continue
          recs += [run(Run(base, "task", arm, lr, s), a, base_dir, data_dir, out, record) for s in a.task_seeds]
  finally:  # one row per invocation, finished or stopped: the code, machine and load the runs were trained with
    record.mkdir(parents=True, exist_ok=True)
    with open(record / "provenance.jsonl", "a") as f:
      f.write(json.dumps(provenance.finished(start, wall_s=round(time.time() - t0), argv=sys.argv[1:])) + "\n")
  return recs


# ----------------------------------------------------------------------------------------------------------
# Tables and figure from the record
# ----------------------------------------------------------------------------------------------------------


def load(record: pathlib.Path) -> tuple[dict[str, dict], list[dict]]:
  bases, runs = {}, []
  for p in sorted(record.rglob("*.json")):
    rec = json.loads(p.read_text())
    if rec.get("kind") == "base":
      bases[rec["base"]] = rec
    elif rec.get("kind") == "run":
      runs.append(rec)
  return bases, runs


def pm(x: list[float], digits: int = 3) -> str:
  return tables.pm(*tables.mean_se(x), digits) if x else ""


def outcome(deltas: list[float]) -> str:
  """"pending" (< 3 paired seeds), "better" (Δ < 0 at 3 standard errors), "worse" (Δ > 0 at 3 SE) or
  "unresolved"."""
  if len(deltas) < 3:
    return "pending"
  m, se = tables.mean_se(deltas)
  if abs(m) >= 3 * se:
    return "better" if m < 0 else "worse"
  return "unresolved"


def decide(deltas: list[float], better: str, worse: str) -> str:
  """`outcome` in words: Δ < 0 favours `better`."""
  o = outcome(deltas)
  return {"pending": f"pending ({len(deltas)} of 3 seeds)", "better": f"**{better}**", "worse": f"**{worse}**",
          "unresolved": "no resolved difference (< 3 SE)"}[o]


LABEL = {"full": "full fine-tuning", "lora": "LoRA", "spiel_ag": "SpIEL-AG", "spiel_ma": "SpIEL-MA"}


def _label(arm: str) -> str:
  m = method_of(arm)
  return LABEL[m] + ("" if m == "full" else f" r={arm.rsplit('_r', 1)[1]}" if m == "lora" else
                     f" (= LoRA r{arm.rsplit('_r', 1)[1]})")


def _arm_order(runs: list[dict]) -> list[str]:
  ranks = sorted({x["rank"] for x in runs if x["rank"]})
  return [x for x in arms(ranks) if any(y["arm"] == x for y in runs)]


def _final(runs: list[dict], base: str, target: str, arm: str, lr: float | None) -> dict[int, dict]:
  return {x["seed"]: x for x in runs if (x["base"], x["target"], x["arm"], x["lr"]) == (base, target, arm, lr)
          and not x.get("failed")}


def stdlib_table(bases: dict, runs: list[dict], base: str) -> str:
  b = bases.get(base, {})
  rows = [{"arm": "none (the base)", "tunable": 0, "test CE": f"{b['test_ce']:.3f}" if b else ""}]
  for arm in _arm_order([x for x in runs if x["base"] == base and x["target"] == "stdlib"]):
    lr = chosen_lr(runs, base, arm)
    grid = sorted((x["lr"], x["dev_ce"]) for x in runs if (x["base"], x["target"], x["arm"], x["seed"]) ==
                  (base, "stdlib", arm, 0))
    shown = ", ".join(f"{v:g}: " + ("failed" if c is None else f"{c:.3f}") for v, c in grid)
    fin = _final(runs, base, "stdlib", arm, lr)
    if not fin:
      rows.append({"arm": _label(arm), "dev CE by lr (seed 0)": shown, "chosen lr": "none (every rate failed)"})
      continue
    edge = " (grid edge)" if len(grid) > 1 and lr in (grid[0][0], grid[-1][0]) else ""
    one = next(iter(fin.values()))
    row = {"arm": _label(arm), "tunable": f"{one['tunable']:,}", "dev CE by lr (seed 0)": shown,
           "chosen lr": f"{lr:g}{edge}",
           "seeds": len(fin), "test CE": pm([x["test_ce"] for x in fin.values()]),
           "Δ vs base": pm([x["test_ce"] - b["test_ce"] for x in fin.values()]) if b else ""}
    if arm.startswith("spiel"):
      lora = _final(runs, base, "stdlib", f"lora_r{one['rank']}", chosen_lr(runs, base, f"lora_r{one['rank']}"))
      d = [fin[s]["test_ce"] - lora[s]["test_ce"] for s in sorted(fin) if s in lora]
      row["Δ vs LoRA, same budget (paired)"] = f"{pm(d)}: {decide(d, 'SpIEL better', 'LoRA better')}" if d else ""
    row["step ms"] = f"{np.median([x['step_ms'] for x in fin.values()]):.0f}"
    row["adapter / optimizer / selection bytes"] = (f"{one['adapter_bytes']:,} / {one['optimizer_bytes']:,} / "
                                                    f"{one['selection_bytes']:,}")
    rows.append(row)
  cols = ["arm", "tunable", "dev CE by lr (seed 0)", "chosen lr", "seeds", "test CE", "Δ vs base",
          "Δ vs LoRA, same budget (paired)", "step ms", "adapter / optimizer / selection bytes"]
  return report.markdown_table(rows, cols)


def task_table(bases: dict, runs: list[dict]) -> str:
  rows = []
  for base in dict.fromkeys(x["base"] for x in runs if x["target"] == "task"):
    b = bases.get(base, {})
    rows.append({"base": base, "arm": "none (the base)", "exact match %": f"{100 * b.get('exact_match', 0):.1f}"})
    for arm in _arm_order([x for x in runs if x["base"] == base and x["target"] == "task"]):
      fin = _final(runs, base, "task", arm, chosen_lr(runs, base, arm))
      rows.append({"base": base, "arm": _label(arm), "lr (chosen on stdlib)": f"{chosen_lr(runs, base, arm):g}",
                   "seeds": len(fin), "exact match %": pm([100 * x["exact_match"] for x in fin.values()], 1),
                   "answer CE": pm([x["task_ce"] for x in fin.values()])})
  return report.markdown_table(rows, ["base", "arm", "lr (chosen on stdlib)", "seeds", "exact match %", "answer CE"])


def cost_line(bases: dict, runs: list[dict]) -> str:
  cpu = sum(x["cpu_s"] for x in runs) + sum((b.get("timing") or {}).get("cpu_s", 0) for b in bases.values())
  wall = sum(x["wall_s"] for x in runs) + sum((b.get("timing") or {}).get("wall_s", 0) for b in bases.values())
  prov = [x["provenance"] for x in runs]
  loads = [p[k] for p in prov for k in ("load_avg_1m", "load_avg_1m_at_end")]
  commits = sorted({p["commit"][:10] for p in prov})
  return (f"Recorded: {len(runs)} runs on {len(bases)} bases, {cpu / 3600:.2f} CPU-hours of training "
          f"({wall / 3600:.2f} h wall; scoring not included), {prov[0]['cores']} cores, load average "
          f"{min(loads):.1f}-{max(loads):.1f}, jax {prov[0]['jax']}, commit {', '.join(commits)}.")


PAPER = "Ansell et al. 2024"


def verdicts_table(bases: dict, runs: list[dict], bench: list[dict]) -> str:
  """The paper's claims, one row per claim x base x budget, in the upcycling studies' form: Δ = SpIEL - LoRA at
  the same tunable-parameter budget, paired by seed, each arm at the LR it chose on dev; decided at 3 SE over >= 3
  seeds (`decide`). Exact match is higher-better, so its Δ is LoRA - SpIEL (negative: SpIEL better) like the loss.
  The two cost claims are measurements, not seed statistics: the optimizer state's bytes (exact) and
  `bench peft`'s step time over LoRA's (`bench`: its records)."""
  rows = []

  def paired(base, target, arm, lora, key, sign=1.0):
    fin = _final(runs, base, target, arm, chosen_lr(runs, base, arm))
    ref = _final(runs, base, target, lora, chosen_lr(runs, base, lora))
    return [sign * (fin[s][key] - ref[s][key]) for s in sorted(fin) if s in ref]

  for method in ("spiel_ag", "spiel_ma"):
    name = LABEL[method]
    for base in dict.fromkeys(x["base"] for x in runs if x["target"] == "stdlib"):
      for arm in _arm_order([x for x in runs if x["base"] == base and x["target"] == "stdlib"]):
        if method_of(arm) != method:
          continue
        r = arm.rsplit("_r", 1)[1]
        d = paired(base, "stdlib", arm, f"lora_r{r}", "test_ce")
        rows.append({"claim": f"{name} matches or beats LoRA at equal tunable parameters ({PAPER})", "base": base,
                     "budget": f"LoRA r={r}", "Δ": f"{name} - LoRA, test CE (nats/byte)", "seeds": len(d),
                     "mean ± SE": pm(d), "verdict": claim_verdict(d)})
    for base in dict.fromkeys(x["base"] for x in runs if x["target"] == "task"):
      for arm in _arm_order([x for x in runs if x["base"] == base and x["target"] == "task"]):
        if method_of(arm) != method:
          continue
        r = arm.rsplit("_r", 1)[1]
        d = paired(base, "task", arm, f"lora_r{r}", "exact_match", -100.0)
        rows.append({"claim": f"{name} matches or beats LoRA on a task at equal tunable parameters ({PAPER})",
                     "base": base, "budget": f"LoRA r={r}", "Δ": f"LoRA - {name}, exact match (points)",
                     "seeds": len(d), "mean ± SE": pm(d, 1), "verdict": claim_verdict(d)})
  for base in dict.fromkeys(x["base"] for x in runs if x["target"] == "stdlib"):
    for arm in _arm_order([x for x in runs if x["base"] == base and x["target"] == "stdlib"]):
      if method_of(arm) != "spiel_ma" or not (fin := _final(runs, base, "stdlib", arm, chosen_lr(runs, base, arm))):
        continue
      r = arm.rsplit("_r", 1)[1]
      ref = next((x for x in runs if (x["base"], x["target"], x["arm"]) == (base, "stdlib", f"lora_r{r}")), None)
      if ref is None:
        continue
      ratio = ref["optimizer_bytes"] / next(iter(fin.values()))["optimizer_bytes"]
      rows.append({"claim": f"SpIEL-MA (SM3) needs far less optimizer memory than LoRA ({PAPER})", "base": base,
                   "budget": f"LoRA r={r}", "Δ": "LoRA / SpIEL-MA, optimizer state bytes", "seeds": "exact",
                   "mean ± SE": f"{ratio:.1f}x", "verdict": "**reproduces**" if ratio > 1 else "**contradicted**"})
  for b in bench:
    lora = b["rows"][0]
    for r in b["rows"][1:]:
      if not r["method"].startswith("spiel_ag"):
        continue
      ratio = r["step_ms"] / lora["step_ms"]
      rows.append({"claim": f"SpIEL-AG's step costs about what LoRA's does ({PAPER}; at most "
                            f"{STEP_COST_BOUND:g}x here)", "base": b["base"], "budget": f"LoRA r={b['rank']}",
                   "Δ": "SpIEL-AG / LoRA, step time (`bench peft`, one run)", "seeds": "-",
                   "mean ± SE": f"{ratio:.2f}x",
                   "verdict": "**reproduces**" if ratio <= STEP_COST_BOUND else "**contradicted**"})
  return report.markdown_table(rows, ["claim", "base", "budget", "Δ", "seeds", "mean ± SE", "verdict"])


def claim_verdict(d: list[float]) -> str:
  """`decide`'s rule for a "SpIEL matches or beats LoRA" claim (Δ < 0: SpIEL better): reproduces when SpIEL is
  better at 3 SE, contradicted when LoRA is; in between no difference is resolved, and one 2 SE or more from zero
  says which way it leans."""
  o, v = outcome(d), decide(d, "reproduces", "contradicted")
  if o in ("better", "worse"):
    return v + (" (SpIEL better)" if o == "better" else " (LoRA better)")
  if o == "pending":
    return v
  m, se = tables.mean_se(d)
  z = math.floor(10 * abs(m) / se) / 10  # rounded down: never "3.0 SE" for an unresolved one
  return v + (f"; leans {'SpIEL' if m < 0 else 'LoRA'} ({z:.1f} SE)" if abs(m) >= 2 * se else "")


def bench_records(root: pathlib.Path = BENCH) -> list[dict]:
  return [json.loads(p.read_text()) for p in sorted(root.glob("peft_*.json"))]


def doc_blocks(record: pathlib.Path) -> dict[str, str]:
  """{block name: markdown} for docs/results.md, from the record alone."""
  bases, runs = load(record)
  if not runs:
    return {"peft": "(no runs recorded in results/studies/peft yet: run the study, copy OUT/record there, then "
                    f"`{GENERATOR}`)"}
  parts = []
  for base in dict.fromkeys(x["base"] for x in runs if x["target"] == "stdlib"):
    parts.append(f"**{base} base**, fine-tuned on stdlib source; test CE in nats/byte, mean ± SE over seeds:\n\n"
                 + stdlib_table(bases, runs, base))
  if any(x["target"] == "task" for x in runs):
    task = next(x for x in runs if x["target"] == "task")["overrides"]
    name = next(o for o in task if o.startswith("data.tasks="))
    parts.append(f"**Exact match** (`{name}`, the 500 test examples), fine-tuned on that task alone:\n\n"
                 + task_table(bases, runs))
  parts.append(cost_line(bases, runs))
  parts.append("![the LR grid (dev loss, seed 0) and test loss at the chosen rates](img/peft_study.png)")
  return {"peft": "\n\n".join(parts), "peft verdicts": verdicts_table(bases, runs, bench_records())}


def figure(record: pathlib.Path, path: pathlib.Path) -> pathlib.Path | None:
  """Per base: dev CE against the learning rate (seed 0; the grid) and test CE at the chosen rate (mean ± SE)."""
  bases, runs = load(record)
  names = list(dict.fromkeys(x["base"] for x in runs if x["target"] == "stdlib"))
  if not names:
    return None
  plt = report._plt()
  fig, axes = plt.subplots(len(names), 2, figsize=(11, 3.6 * len(names)), dpi=110, squeeze=False)
  for row, base in zip(axes, names):
    mine = [x for x in runs if x["base"] == base and x["target"] == "stdlib"]
    order = _arm_order(mine)
    for i, arm in enumerate(order):
      g = sorted((x["lr"], x["dev_ce"]) for x in mine if x["arm"] == arm and x["seed"] == 0 and not x.get("failed"))
      if not g:
        continue
      row[0].plot(*zip(*g), marker="o", color=f"C{i}", label=_label(arm))
      ce = [x["test_ce"] for x in _final(runs, base, "stdlib", arm, chosen_lr(runs, base, arm)).values()]
      m, se = tables.mean_se(ce)
      row[1].errorbar([i], [m], yerr=[0 if math.isnan(se) else se], fmt="o", color=f"C{i}", capsize=3)
    if base in bases:
      row[1].axhline(bases[base]["test_ce"], color="gray", ls="--", lw=1, label="the base")
      row[1].legend(fontsize=7)
    row[0].set(xscale="log", xlabel="learning rate", ylabel="dev CE (seed 0)", title=f"{base}: the LR grid")
    row[1].set(xticks=range(len(order)), ylabel="test CE", title=f"{base}: at the chosen lr, mean ± SE")
    row[1].set_xticklabels([_label(x) for x in order], rotation=30, ha="right", fontsize=7)
    row[0].legend(fontsize=7)
  return report.save_figure(fig, path)


def write_docs(record: pathlib.Path, doc: pathlib.Path = DOC, img: pathlib.Path | None = None) -> list[str]:
  done = []
  for name, block in doc_blocks(record).items():
    report.write_doc_block(doc, GENERATOR, name, block)
    done.append(f"{name} -> {doc}")
  png = figure(record, img or doc.parent / "img" / "peft_study.png")
  return done + ([str(png)] if png else [])


# ----------------------------------------------------------------------------------------------------------


def _lr_grid(items: list[str]) -> dict[str, tuple[float, ...]]:
  grid = dict(LRS)
  for it in items:
    method, _, values = it.partition("=")
    if method not in LRS or not values:
      raise SystemExit(f"--lr {it!r}: write METHOD=lr1,lr2,... with METHOD one of {', '.join(LRS)}")
    grid[method] = tuple(float(v) for v in values.split(","))
  return grid


def parse(argv: list[str] | None = None) -> argparse.Namespace:
  ap = argparse.ArgumentParser(prog="peft_study", description=__doc__.split("\n\n")[0])
  ap.add_argument("--out", default="runs/peft_study")
  ap.add_argument("--record", default=str(ROOT / "results" / "studies" / "peft"), help="what --write-docs reads")
  ap.add_argument("--write-docs", action="store_true", help="regenerate the docs/results.md block and the figure")
  ap.add_argument("--bases", nargs="+", default=["lm_dense_tiny", "lm_moe_tiny"])
  ap.add_argument("--pretrain-steps", type=int, default=300)
  ap.add_argument("--steps", type=int, default=220, help="fine-tuning steps (220: 11 SpIEL reselections)")
  ap.add_argument("--ranks", type=int, nargs="+", default=[2, 8])
  ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="0 must be among them (the LR grid's)")
  ap.add_argument("--lr", nargs="*", default=[], metavar="METHOD=LR,LR,...", help=f"replace a grid ({LRS})")
  ap.add_argument("--arms", nargs="*", default=[], help="only these arms (full, lora_r2, spiel_ag_r8, ...)")
  ap.add_argument("--task", default="lookup", help="the exact-match target ('' to skip it)")
  ap.add_argument("--task-seeds", type=int, nargs="+", default=None, help="the task target's seeds (default --seeds)")
  ap.add_argument("--task-examples", type=int, default=500, help="test examples scored (the task's 500: all)")
  ap.add_argument("--b2", type=float, default=0.999, help="AdamW's beta2, every method but SpIEL-MA (SM3); the reference code's 0.999")
  ap.add_argument("--max-bytes", type=int, default=MAX_BYTES)
  ap.add_argument("--ckpt-every", type=int, default=50)
  ap.add_argument("--dev-eval-steps", type=int, default=DEV_EVAL_STEPS)
  ap.add_argument("--test-eval-steps", type=int, default=TEST_EVAL_STEPS)
  ap.add_argument("--keep-checkpoints", action="store_true", help="keep each finished run's last checkpoint")
  ap.add_argument("--in-process", action="store_true", help="train in this process (the tests' toy twin)")
  ap.add_argument("--overrides", nargs="*", default=list(SMALL), help="a.b=v applied to every run, the bases' too")
  a = ap.parse_args(argv)
  if 0 not in a.seeds:
    ap.error("--seeds must include 0 (the LR grid runs at seed 0)")
  a.lr = _lr_grid(a.lr)
  a.task_seeds = a.seeds if a.task_seeds is None else a.task_seeds
  return a


def main(argv: list[str] | None = None) -> int:
  a = parse(argv)
  if a.write_docs:
    for line in write_docs(pathlib.Path(a.record)):
      print(f"peft_study: wrote {line}")
    return 0
  t0 = time.time()
  study(a)
  blocks = doc_blocks(pathlib.Path(a.out) / "record")
  print("\n\n".join(blocks.values()))
  print(f"peft_study: this invocation {time.time() - t0:.0f} s; the record is {pathlib.Path(a.out) / 'record'}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
