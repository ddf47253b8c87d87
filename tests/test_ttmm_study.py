"""scripts/ttmm_study.py and scripts/ttmm_report.py: docs/results.md's TTMM block is what the stored records
(results/studies/ttmm) make, "not run yet" while there are none; the report means over seeds, picks TTT on dev and
applies the verdict rule; the study's tiny twin runs end to end and, invoked again, skips every recorded part."""

import importlib
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from moejax import checkpoint, config, registry, report, sharding, train

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def scripts():
  sys.path.insert(0, str(ROOT / "scripts"))
  return importlib.import_module("ttmm_study"), importlib.import_module("ttmm_report")


def test_docs_ttmm_block_equals_the_stored_records(scripts):
  _, rep = scripts
  got = report.doc_block(rep.DOC.read_text(), rep.GENERATOR, rep.BLOCK)
  assert got is not None, f"docs/results.md has lost its generated {rep.BLOCK!r} block"
  want = rep.block(rep.STORED)
  if not rep.load(rep.STORED):
    assert want == rep.NOT_RUN  # no records: the doc must say so, not show numbers
  assert got == want, f"docs/results.md's TTMM block differs from the records: run `python {rep.GENERATOR}`"


def _eval(methods: dict, cost: float = 10.0, merged: float = 2.0) -> dict:
  return {"mean_experts_merged": merged, "documents": 4,
          "methods": {m: {"perplexity": p, "cost_ms_per_prompt": cost} for m, p in methods.items()}}


def _write(d: pathlib.Path, name: str, result: dict, wall: float = 60.0) -> None:
  args = {"epochs": 3.0, "train_tokens": 2048, "holdout": 0.1, "rank": 8, "lr": 3e-3, "neighbors": 8,
          "ttt_steps": [8, 24, 64], "ttt_lrs": [1e-3, 3e-3, 1e-2]}
  prov = {"commit": "abcdef0123", "cores": 2, "load_avg_1m": 1.0, "load_avg_1m_at_end": 2.0, "jax": "0.0"}
  (d / name).parent.mkdir(parents=True, exist_ok=True)
  (d / f"{name}.json").write_text(json.dumps({"wall_s": wall, "cpu_s": 2 * wall, "provenance": prov, "args": args,
                                              "result": result}))


def test_report_means_over_seeds_picks_ttt_on_dev_and_applies_the_rule(scripts, tmp_path):
  _, rep = scripts
  ttmm4 = {0: 12.0, 1: 12.2, 2: 12.4}  # mean 12.2, SE 0.1155
  for s in range(3):
    bank = {"steps_per_expert": [10, 20], "heldout_mean": [{"step": 0, "loss": 3.0}, {"step": 5, "loss": 2.0},
                                                             {"step": 9, "loss": 2.5}]}
    for part in ("k1", "k4", "whole_step"):
      _write(tmp_path, f"s{s}/{part}/bank", bank)
    _write(tmp_path, f"s{s}/eval_k1", _eval({"ttmm": 11.0 + s}))
    _write(tmp_path, f"s{s}/eval_k4", _eval({"ttmm": ttmm4[s], "nearest": (13.0, 13.0, 13.4)[s],
                                              "ensemble": ttmm4[s] - 0.01}))
    _write(tmp_path, f"s{s}/eval_whole_step", _eval({"ttmm": 13.5}))
    _write(tmp_path, f"s{s}/eval_ttt", _eval({"ttt": 11.5}, cost=500.0))
  _write(tmp_path, "eval_base", _eval({"base": 14.0}))
  for (n, lr), p in {(8, 0.001): 13.0, (24, 0.001): 12.5, (8, 0.01): 12.9}.items():
    _write(tmp_path, f"ttt_dev/steps{n}_lr{lr:g}", _eval({"ttt": p}))
  # The base grid unfinished: the label names the point the study runs next (its base grid, in order).
  assert "| TTT (24 steps, lr 0.001: best on dev so far; the grid goes on to 8 steps, lr 0.003) |" in rep.block(tmp_path)
  for n in (8, 24, 64):  # the whole base grid, its best (24, 0.003) interior: the choice is final
    for lr in (1e-3, 3e-3, 1e-2):
      _write(tmp_path, f"ttt_dev/steps{n}_lr{lr:g}", _eval({"ttt": 12.4 if (n, lr) == (24, 3e-3) else 13.0}))
  text = rep.block(tmp_path)
  assert "| TTMM (mean 2.0 experts merged) | 4 | 15 | 12.200 ± 0.115 | 3 | 10.0 |" in text
  assert "| TTT (24 steps, lr 0.003: best on dev) | - | 24 | 11.500 ± 0.000 | 3 | 500.0 |" in text
  _write(tmp_path, "ttt_dev/steps64_lr0.01", _eval({"ttt": 12.0}))  # now the corner is best: the grid extends
  assert "TTT (64 steps, lr 0.01: best on dev so far; the grid goes on to 128 steps, lr 0.01)" in rep.block(tmp_path)
  # ttmm - nearest = -1.0, -0.8, -1.0: mean -0.933, SE 0.067 at 3 seeds (14 SE)
  assert ("| TTMM beats the nearest expert alone (K=4; Bertolissi et al. 2025) | TTMM - nearest, test perplexity | 3 | "
          "-0.933 ± 0.067 | **reproduces** |") in text
  # k1 - whole_step = -2.5, -1.5, -0.5 (the budget helps): mean -1.5, SE 0.577 (2.6 SE): not decided at 3 seeds
  assert "(training budget) | LoRA (K=1) - LoRA (one expert's steps), test perplexity | 3 | -1.500 ± 0.577 | unresolved at 3 seeds" in text
  assert "the logit ensemble beats TTMM (K=4; one forward per kept expert) | ensemble - TTMM, test perplexity | 3 | -0.010 ± 0.000 | **reproduces**" in text
  # per query: TTMM 10 ms, TTT 500 ms in every seed
  assert "| TTMM (K=4) costs a fraction of TTT per query (Bertolissi et al. 2025) | TTMM - TTT, cost per query (ms) | 3 | -490.000 ± 0.000 | **reproduces** |" in text
  assert "| k4 | 3.000 | 2.000 | 2.500 | +0.500 |" in text  # held-out: start, best, end
  assert "The base on the same dev half" not in text  # no dev_base record: no such line
  _write(tmp_path, "dev_base", _eval({"base": 13.9}))
  assert ("The base on the same dev half: 13.900; TTT at the chosen point moves dev from it to 12.000, test from "
          "14.000 to 11.500 (mean of 3 seeds).") in rep.block(tmp_path)
  assert "TTT's test runs: 30.0 CPU-seconds per query (the process's CPU time over its documents, mean of 3 seeds); the wall-clock cost in the table was measured at load average 1.0-2.0." in text  # 120 CPU-s / 4
  assert "| **total** | 31 | 31.0 | **1.03** |" in text  # 31 records of 60 s wall, 120 s CPU each (before dev_base)
  assert rep.block(tmp_path / "absent") == rep.NOT_RUN


def _tiny_base(d: pathlib.Path) -> pathlib.Path:
  """A base run dir of random weights (a params-only step, as import-hf writes): the twin trains no base."""
  cfg = registry.get("lm_dense_pycode_tiny", ["model.d_model=32", "model.num_layers=2", "model.num_heads=2",
                                              "model.d_ff=64", "data.seq_len=32", "data.batch_size=8"])
  s = train.setup(cfg)
  d.mkdir(parents=True)
  (d / "config.json").write_text(config.to_json(cfg))
  with checkpoint.Manager(d) as m:
    m.save(0, train.params_only_state(s, sharding.create_params(jax.random.key(0), s.specs, s.mesh), 0), cfg,
           force=True)
  return d


def test_study_twin_runs_end_to_end_then_skips_what_is_recorded(scripts, tmp_path):
  study, rep = scripts
  argv = ["--root", str(tmp_path / "root"), "--base", str(_tiny_base(tmp_path / "base")), "--seeds", "0", "--ks", "2",
          "--epochs", "0.1", "--train-tokens", "256", "--rank", "2", "--max-docs", "8", "--neighbors", "2",
          "--ttt-steps", "1", "--ttt-lrs", "0.01", "--eval-every", "100", "--set", "ttmm.doc_tokens=64",
          "ttmm.prefix_tokens=16"]
  # In a process of its own on one CPU device (this suite's 8 fake devices make every compile slower), with a
  # compilation cache so that the parts running the same program (TTT on dev and on test) compile it once.
  env = {**os.environ, "XLA_FLAGS": os.environ.get("XLA_FLAGS", "").replace(
    "--xla_force_host_platform_device_count=8", ""), "PYTHONPATH": str(ROOT),
    "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache"), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  done = subprocess.run([sys.executable, str(ROOT / "scripts" / "ttmm_study.py"), *argv], env=env,
                        capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-3000:]
  record = tmp_path / "root" / "record"
  names = sorted(rep.load(record))
  assert names == ["dev_base", "eval_base", "s0/eval_k2", "s0/eval_ttt", "s0/eval_whole_step", "s0/k2/bank",
                   "s0/whole_step/bank", "ttt_dev/steps1_lr0.01"]
  assert json.loads((record / "dev_base.json").read_text())["result"]["part"] == "dev"
  k2 = json.loads((record / "s0" / "k2" / "bank.json").read_text())
  assert k2["provenance"]["cores"] >= 1 and k2["provenance"]["jax"] == jax.__version__ and k2["wall_s"] > 0
  steps = k2["result"]["steps_per_expert"]  # 0.1 epochs of each cluster's tokens, in steps of 8 x 32
  assert k2["result"]["step"] == max(steps) and len(steps) == 2
  whole = json.loads((record / "s0" / "whole_step" / "bank.json").read_text())["result"]
  assert whole["steps_per_expert"] == [max(1, round(sum(steps) / 2))]  # one K=2 expert's mean steps
  assert [h["step"] for h in k2["result"]["heldout_mean"]] == [0, max(steps)]  # held-out loss at start and end
  ev = json.loads((record / "s0" / "eval_k2.json").read_text())["result"]
  assert ev["part"] == "test" and set(ev["methods"]) == {"ttmm", "nearest", "ensemble"}
  assert all(np.isfinite(m["perplexity"]) for m in ev["methods"].values())
  before = {n: (record / f"{n}.json").read_text() for n in names}
  assert study.run_study(study_args(study, argv)) == []  # everything recorded: nothing runs again
  assert {n: (record / f"{n}.json").read_text() for n in names} == before
  doc = tmp_path / "results.md"
  a, b = report.doc_markers(rep.GENERATOR, rep.BLOCK)
  doc.write_text(f"# x\n{a}\nold\n{b}\n")
  rep.write(record, doc, tmp_path / "fig.png")
  text = report.doc_block(doc.read_text(), rep.GENERATOR, rep.BLOCK)
  assert text == rep.block(record) and "| TTMM (mean" in text and "TTT (1 steps, lr 0.01" in text
  assert (tmp_path / "fig.png").stat().st_size > 0


def test_ttt_dev_grid_extends_past_an_edge_that_holds_the_best_point():
  sys.path.insert(0, str(ROOT / "scripts"))
  from studylib import grids

  steps, lrs = (8, 24, 64), (1e-3, 3e-3, 1e-2)
  base = {(n, lr): 20.0 - n / 10 - 100 * lr for n in steps for lr in lrs}  # best at the (64, 1e-2) corner
  assert grids.next_point(base, steps, lrs) == (128, 1e-2)  # steps first, then the rate
  # A landscape with its minimum at (128, 3e-2): the walk reaches it, tries one step beyond in each coordinate
  # and stops there (interior), every point tried once.
  f = lambda n, lr: abs(n - 128) / 64 + abs(lr - 3e-2) * 50
  grid = {k: f(*k) for k in base}
  while (p := grids.next_point(grid, steps, lrs)) is not None:
    assert p not in grid
    grid[p] = f(*p)
  assert min(grid, key=grid.get) == (128, 3e-2)
  assert {(128, 1e-2), (256, 1e-2), (128, 3e-2), (128, 1e-1)} <= set(grid)
  # At most EXTEND values past each end: a score that keeps improving upwards stops at 64 * 2**EXTEND steps.
  grid = {k: -k[0] - k[1] for k in base}
  while (p := grids.next_point(grid, steps, lrs)) is not None:
    grid[p] = -p[0] - p[1]
  assert max(k[0] for k in grid) == 64 * 2 ** grids.EXTEND and max(k[1] for k in grid) == 1e-1
  assert grids.next_point({(8, 1e-2): 1.0}, (8,), (1e-2,)) is None  # one value per coordinate: held fixed
  # interior best: nothing to add
  assert grids.next_point({k: abs(k[0] - 24) + abs(k[1] - 3e-3) for k in base}, steps, lrs) is None


def study_args(study, argv):
  return study.parser().parse_args(argv)


def test_a_preempted_bank_stops_the_study_and_is_not_recorded(scripts, tmp_path, monkeypatch):
  """A bank build that returns `preempted` (SIGTERM: checkpointed, unfinished) ends the study with a message and
  records nothing, so the next invocation resumes that bank instead of evaluating a half-trained one; the time it
  spent is kept outside the record, for the bank's record once it finishes."""
  study, _ = scripts
  from moejax.ttmm import bank

  calls = []
  monkeypatch.setattr(bank, "build", lambda *a, **k: calls.append(a) or {"status": "preempted", "resumed_from": 0,
                                                                           "step": 3})
  argv = ["--root", str(tmp_path / "root"), "--base", str(tmp_path / "base"), "--seeds", "0", "--ks", "2"]
  with pytest.raises(SystemExit, match="s0/k2's bank preempted at step 3; re-run to resume"):
    study.run_study(study_args(study, argv))
  assert len(calls) == 1 and not list((tmp_path / "root" / "record").rglob("*.json"))
  spent = json.loads((tmp_path / "root" / "partial" / "s0" / "k2" / "bank.json").read_text())  # kept for the resume
  assert (spent["invocations"], spent["timed_from_step"]) == (1, 0)


def test_a_part_preempted_and_resumed_is_charged_for_every_invocation(scripts, tmp_path, monkeypatch):
  """Recorder: a part stopped twice by `Preempted` and then finished records the wall and CPU time of all three
  invocations, their count and the step the first one started at; nothing is recorded (or left over) before."""
  study, rep = scripts
  clock = iter(range(0, 100, 5))  # each perf_counter / process_time reading 5 s after the last
  monkeypatch.setattr(study.time, "perf_counter", lambda: float(next(clock)))
  monkeypatch.setattr(study.time, "process_time", lambda: 1.0)
  rec = study.Recorder(tmp_path / "record", {}, tmp_path / "partial")
  for from_step in (0, 25):
    def stopped(from_step=from_step):
      raise study.Preempted("stopped", from_step)
    with pytest.raises(study.Preempted):
      rec.run("s0/k4/bank", stopped)
    assert not rec.done("s0/k4/bank")
  rec.run("s0/k4/bank", lambda: {"resumed_from": 50, "step": 98})
  r = json.loads((tmp_path / "record" / "s0" / "k4" / "bank.json").read_text())
  assert (r["wall_s"], r["cpu_s"], r["invocations"], r["timed_from_step"]) == (15.0, 0.0, 3, 0)
  assert not list((tmp_path / "partial").rglob("*.json"))
  assert rep.timing_gaps(tmp_path / "record") == {}  # timed from step 0: no gap


def test_only_splits_the_study_between_two_processes(scripts, tmp_path, monkeypatch):
  """`--only banks` runs each seed's banks and their evaluations and no TTT; `--only ttt` then runs the TTT dev
  grid and its test runs and nothing else: side by side over one root they make exactly the parts that one whole
  invocation makes (the training and scoring are stubbed here: this is the study's bookkeeping)."""
  study, _ = scripts
  from moejax.ttmm import bank, evaluate

  def build(base, k, d, overrides, progress, embeddings):
    d = pathlib.Path(d)
    d.mkdir(parents=True, exist_ok=True)
    (d / "metrics.jsonl").write_text(json.dumps({"split": "heldout", "step": 4, "loss": 2.0}) + "\n")
    np.savez(d / "clusters.npz", embeddings=np.zeros((3, 2)))
    steps = next((int(o.split("=")[1]) for o in overrides if o.startswith("train.steps=")), 4 + k)
    return {"status": "completed", "steps_per_expert": [steps] * k}

  monkeypatch.setattr(bank, "build", build)
  monkeypatch.setattr(evaluate, "evaluate", lambda bank, split, methods, progress, overrides: {
    "methods": {m: {"perplexity": 10.0} for m in methods}})
  argv = ["--base", str(tmp_path / "base"), "--seeds", "0", "1", "--ks", "1", "2", "--ttt-steps", "8",
          "--ttt-lrs", "0.01"]
  split = [*argv, "--root", str(tmp_path / "split")]
  banks = study.run_study(study_args(study, [*split, "--only", "banks"]))
  assert banks and not [n for n in banks if "ttt" in n]
  ttt = study.run_study(study_args(study, [*split, "--only", "ttt"]))
  assert ttt == ["ttt_dev/steps8_lr0.01", "dev_base", "s0/eval_ttt", "s1/eval_ttt"]
  whole = study.run_study(study_args(study, [*argv, "--root", str(tmp_path / "whole")]))
  assert sorted(whole) == sorted(banks + ttt)
  record = tmp_path / "split" / "record"
  assert sorted(str(p.relative_to(record))[:-5] for p in record.rglob("*.json")) == sorted(whole)
  assert "only" not in json.loads((record / "s0" / "eval_ttt.json").read_text())["args"]  # not the study's setup
  # The whole-corpus LoRA of one expert's steps is built for the largest K of --ks: a later invocation whose --ks
  # ends elsewhere would evaluate another budget under the same name, so it stops instead.
  with pytest.raises(SystemExit, match=r"recorded with 6 steps, not one K=1 expert's mean \(5\)"):
    study.run_study(study_args(study, [*split, "--ks", "1"]))
