"""The issue-17 study experiments: their tiny twins train two steps, grouped so that each distinct program
compiles once (budget variants differ from a trained twin only in run length, checked here field by field)."""

import json
import pathlib
import sys

import jax
import numpy as np
import pytest
import test_train
from study_twins import GROUPED_TWINS

from moejax import checkpoint, config, optim, registry, sharding, train

TWO_STEPS = {"train.eval_steps": 1, "train.log_every": 1, "train.checkpoint_every": 2, "train.eval_every": 2}
SHRINK_CLIP = {"clip.vision.num_layers": 2, "clip.text.num_layers": 2, "data.batch_size": 16,
               "clip.eval_examples": 16, **TWO_STEPS}
SHRINK_LM = {"model.num_layers": 2, "data.batch_size": 8, "data.seq_len": 64, "data.task_eval_examples": 4,
             **TWO_STEPS}
RUN_LENGTH = {"name", "train.steps", "train.schedule_steps", "train.eval_every", "train.checkpoint_every",
              "init.upcycle_from"}
# twin -> the trained twin it equals up to RUN_LENGTH fields (and, for scratch/active/large, the fields named)
SAME_PROGRAM = {
  "scenes_clip_dense_1500_tiny": ("scenes_clip_dense_tiny", set()),
  "scenes_clip_up_1500_tiny": ("scenes_clip_up_tiny", set()),
  "scenes_clip_sparse_scratch_tiny": ("scenes_clip_up_tiny", {"optim.lr", "init.continue_step"}),
  "scenes_clip_sparse_scratch_1500_tiny": ("scenes_clip_sparse_scratch_tiny", set()),
  "scenes_clip_dense_active_tiny": ("scenes_clip_dense_tiny", {"clip.vision.d_ff", "clip.text.d_ff"}),
  "scenes_clip_dense_active_1500_tiny": ("scenes_clip_dense_active_tiny", set()),
  "scenes_clip_dense_large_tiny": ("scenes_clip_dense_tiny", {"clip.vision.d_model", "clip.vision.d_ff",
                                                              "clip.text.d_model", "clip.text.d_ff",
                                                              "clip.embed_dim"}),
  # trained in test_train.py (clip_up_tiny, lm_dense_mix_tiny): the same programs on another data set / length
  "scenes_clip_up_tiny": ("clip_up_tiny", {"data.dataset", "clip.text.max_seq_len", "clip.augment_shift",
                                           "clip.augment_noise", "clip.zeroshot_templates"}),
  "lm_dense_mix_300_tiny": ("lm_dense_mix_tiny", set()),
  # the knobs: the shared backbone and capacity dispatch train together in scenes_clip_up_shared_tiny's twin
  "scenes_clip_dense_shared_tiny": ("scenes_clip_dense_tiny", {"clip.shared_backbone"}),
  "scenes_clip_up_capacity_tiny": ("scenes_clip_up_tiny", {f"clip.{t}.moe.{k}" for t in ("vision", "text")
                                                           for k in ("dispatch", "capacity_factor")}),
  "lm_dense_mix_1500_tiny": ("lm_dense_mix_300_tiny", set()),
  "lm_dense_mix_3000_tiny": ("lm_dense_mix_300_tiny", set()),
  "lm_upcycle_mix_1500_tiny": ("lm_upcycle_mix_300_tiny", set()),
  "lm_upcycle_mix_3000_tiny": ("lm_upcycle_mix_300_tiny", set()),
  # the mature-parent study: the same programs with a warmup-stable-decay schedule (tests/test_config.py)
  "lm_dense_mix_wsd_tiny": ("lm_dense_mix_300_tiny", {"optim.decay_start", "optim.min_lr_ratio"}),
  "lm_upcycle_mix_wsd_tiny": ("lm_upcycle_mix_300_tiny", {"optim.decay_start", "optim.min_lr_ratio"}),
  "scenes_clip_dense_wsd_tiny": ("scenes_clip_dense_tiny", {"optim.decay_start", "optim.min_lr_ratio"}),
  "scenes_clip_up_wsd_tiny": ("scenes_clip_up_tiny", {"optim.decay_start", "optim.min_lr_ratio"}),
  "scenes_clip_sparse_scratch_wsd_tiny": ("scenes_clip_sparse_scratch_tiny", {"optim.min_lr_ratio"}),
}
TRAINED = ("scenes_clip_dense_tiny", "scenes_clip_up_shared_tiny", "lm_upcycle_mix_300_tiny")


_flat = test_train._flat  # a config as {dotted.key: value}


def test_every_study_twin_is_trained_or_the_same_program_as_one():
  assert set(GROUPED_TWINS) == set(TRAINED) | set(SAME_PROGRAM), set(GROUPED_TWINS) ^ (set(TRAINED) | set(SAME_PROGRAM))
  assert {"clip_up_tiny", "lm_dense_mix_tiny"} <= set(test_train.TINY_TWINS)  # trained one by one there
  for name, (twin, allowed) in SAME_PROGRAM.items():
    a, b = _flat(config.to_dict(registry.get(name))), _flat(config.to_dict(registry.get(twin)))
    differ = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
    assert differ <= RUN_LENGTH | allowed, (name, twin, differ - RUN_LENGTH - allowed)
    assert allowed <= differ, (name, allowed - differ)  # the variant really changes what it says it changes


def _train(name: str, shrink: dict, workdir, steps: int, **over) -> dict:
  cfg = config.derive(registry.get(name), {**shrink, "train.steps": steps, **over})
  r = train.train(cfg, workdir, progress=False)
  assert r["step"] == steps and np.isfinite(r["eval"]["loss"]), (name, r)
  return r


def _random_parent(name: str, shrink: dict, workdir) -> None:
  """A dense parent saved at step 0 with random params, as import-hf would: upcycling needs no trained parent."""
  dense = config.derive(registry.get(name), shrink)
  s = train.setup(dense)
  m = checkpoint.Manager(workdir)
  m.save(0, train.params_only_state(s, sharding.create_params(jax.random.key(0), s.specs, s.mesh)), dense, force=True)
  m.close()


def test_clip_study_twins_train_two_steps(tmp_path):
  """The scenes dense twin trains 2 steps (the data path, zero-shot eval); one CLIP-UP twin covers the recipe's
  two knobs in one compile: the shared backbone upcycled, with capacity dispatch (factor 1.5)."""
  dense = _train("scenes_clip_dense_tiny", SHRINK_CLIP, tmp_path / "dense", 2)
  assert "zeroshot_top1" in dense["eval"]  # the scenes' shape labels give a zero-shot eval
  _random_parent("scenes_clip_dense_shared_tiny", SHRINK_CLIP, tmp_path / "shared")
  cap = {f"clip.{t}.moe.{k}": v for t in ("vision", "text") for k, v in (("dispatch", "capacity"),
                                                                         ("capacity_factor", 1.5))}
  _train("scenes_clip_up_shared_tiny", SHRINK_CLIP, tmp_path / "up", 2,
         **{"init.upcycle_from": str(tmp_path / "shared"), **cap})


def test_lm_upcycle_study_twin_trains_two_steps(tmp_path):
  """Upcycled from a random dense parent saved at step 0 (the dense twin, lm_dense_mix_tiny's program, trains in
  test_train): one compile."""
  _random_parent("lm_dense_mix_300_tiny", SHRINK_LM, tmp_path / "dense")
  _train("lm_upcycle_mix_300_tiny", SHRINK_LM, tmp_path / "up", 2, **{"init.upcycle_from": str(tmp_path / "dense")})


# ----------------------------------------------------------------------------------------------------------
# scripts/studies.py: the plan, arm selection and the mean +- SE aggregation (synthetic runs; nothing trains)
# ----------------------------------------------------------------------------------------------------------

def _studies():
  """scripts/studylib's modules as one namespace (studies.plan, studies.table, ...); `.execute_module` is the
  module itself, for a test that swaps its training command."""
  import pathlib
  import types

  sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent / "scripts"))
  from studylib import execute, figures, plan, records, tables

  ns = {k: v for m in (plan, records, execute, tables, figures) for k, v in vars(m).items() if not k.startswith("__")}
  return types.SimpleNamespace(**ns, execute_module=execute)


def _fake_run(studies, r, evals: dict[int, float], first_train_step: int) -> None:
  """A run dir as moejax train leaves it, for the aggregation: its resolved config and metric rows."""

  cfg = config.apply_overrides(registry.get(r.experiment), r.overrides)
  r.workdir.mkdir(parents=True, exist_ok=True)
  (r.workdir / "config.json").write_text(json.dumps(config.to_dict(cfg)))
  rows = [{"split": "train", "step": first_train_step, "ce_loss": 9.0}]
  rows += [{"split": "eval", "step": s, "ce_loss": v, "loss": v + 1.0} for s, v in evals.items()]
  (r.workdir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))


def test_studies_plan_select_and_mean_se_table(tmp_path):
  studies = _studies()
  runs = [r for r in studies.plan("lm_upcycle", tmp_path, [0, 1], [300]) if r.arm != "dense_flops"]
  for r in runs:
    registry.get(r.experiment)  # every run names a registered experiment
  picked = studies.select(runs, ["upcycled"])
  assert [r.arm for r in picked] == ["dense_pretrain", "upcycled"] * 2  # a parent comes with its child
  try:
    studies.select(runs, ["upcyled"])
    raise AssertionError("an unknown arm was accepted")
  except SystemExit as e:
    assert "upcyled" in str(e) and "upcycled" in str(e)
  clip = studies.plan("clip_up", tmp_path, [0], [300, 1500])
  assert {r.arm for r in studies.select(clip, ["dense_continued"])} == {"dense_pretrain", "dense_continued"}
  assert len([r for r in clip if r.budget == 1500]) == 7  # the knobs run at the smaller budget only
  cap = studies.plan("capacity", tmp_path, [0], [300])  # the clip_up study's own runs, not copies of them
  assert [r.arm for r in cap] == ["dense_pretrain", "dense_continued", "dense_large"]
  assert {r.workdir for r in cap} <= {r.workdir for r in clip}

  # seed s: dense continued ends at 2.0 + 0.1 s, the upcycled run at 1.8 + 0.3 s; both parents at 3.0 (step 300)
  by = {(r.arm, r.seed): r for r in runs}
  for s in (0, 1):
    _fake_run(studies, by["dense_pretrain", s], {150: 4.0, 300: 3.0}, 1)
    _fake_run(studies, by["dense_continued", s], {150: 4.0, 300: 3.0, 450: 2.5, 600: 2.0 + 0.1 * s}, 1)
    _fake_run(studies, by["upcycled", s], {450: 2.4, 600: 1.8 + 0.3 * s}, 301)
  rows = {r["arm"]: r for r in studies.table(runs, "lm_upcycle")}
  assert set(rows) == {"dense_continued", "upcycled"}  # the pretrain is a parent, not an arm of the table
  # mean +- standard error over the two seeds: (2.0, 2.1) -> 2.05 +- 0.05; (1.8, 2.1) -> 1.95 +- 0.15
  assert rows["dense_continued"]["eval loss"] == "2.050 ± 0.050", rows
  assert rows["upcycled"]["eval loss"] == "1.950 ± 0.150", rows
  # paired by seed (same parent, same data): differences (-0.2, 0.0) -> -0.1 +- 0.1
  assert rows["upcycled"]["Δ vs dense (paired)"] == "-0.100 ± 0.100", rows
  # the upcycled curve starts at its parent's step-300 eval, and its FLOPs count the parent's 300 dense steps
  steps, vals, flops = studies.curve(by["upcycled", 0])
  assert list(steps) == [300, 450, 600] and vals[0] == 3.0
  dense_step = flops[0] / 300
  moe_step = (flops[2] - flops[1]) / 150
  assert moe_step > dense_step  # top-2 of 8 experts in two layers costs more per step than the dense MLPs
  np.testing.assert_allclose(studies.curve(by["dense_continued", 0])[2][-1], 600 * dense_step, rtol=1e-12)
  # at the dense runs' final FLOPs (the smallest), each seed's upcycled curve is interpolated in FLOPs
  key = "loss @ equal FLOPs (interpolated)"
  assert rows["upcycled"]["equal-FLOPs point (TFLOPs)"] == f"{600 * dense_step / 1e12:.2f}"
  at = [np.interp(600 * dense_step, flops, [3.0, 2.4, 1.8 + 0.3 * s]) for s in (0, 1)]
  assert 300 * dense_step + 150 * moe_step < 600 * dense_step  # the point lies between steps 450 and 600
  assert rows["upcycled"][key] == f"{np.mean(at):.3f} ± {np.std(at, ddof=1) / np.sqrt(2):.3f}", rows["upcycled"]
  assert rows["dense_continued"][key] == rows["dense_continued"]["eval loss"]
  # a seed whose dense partner has not run yet counts in the arm's mean, not in the paired differences, which say so
  runs3 = studies.plan("lm_upcycle", tmp_path, [0, 1, 2], [300])
  by3 = {(r.arm, r.seed): r for r in runs3}
  _fake_run(studies, by3["dense_pretrain", 2], {150: 4.0, 300: 3.0}, 1)
  _fake_run(studies, by3["upcycled", 2], {450: 2.4, 600: 1.8}, 301)
  up3 = {r["arm"]: r for r in studies.table(runs3, "lm_upcycle")}["upcycled"]
  assert up3["seeds"] == 3 and up3["eval loss"] == f"{np.mean([1.8, 2.1, 1.8]):.3f} ± 0.100", up3
  assert up3["Δ vs dense (paired)"] == "-0.100 ± 0.100 (n=2)" and up3["Δ @ equal FLOPs (interpolated, paired)"].endswith(" (n=2)")


def test_flop_matched_arms_end_their_own_schedules_at_the_matched_budget(tmp_path):
  """lm_upcycle's dense_flops and lm_mature's arms: each run's schedule ends at its own last step; the dense
  arm's extra steps cost what the upcycled arm's cost (FLOPs per step from the configs); lm_mature's parent is
  shared by every budget, at constant LR, and its arms decay from its last step; the table compares the upcycled
  arm with its FLOP-matched dense arm (paired), the interpolated view labelled as such."""
  studies = _studies()
  ratio = studies.flops_ratio("lm_dense_mix_300_tiny", "lm_upcycle_mix_300_tiny")
  assert 1.0 < ratio < 4.0  # top-2 of 8 in two of four layers: more than the dense MLPs, less than 4x the model
  for r in [r for r in studies.plan("lm_upcycle", tmp_path, [0], [300, 1500]) if r.arm == "dense_flops"]:
    cfg = config.apply_overrides(registry.get(r.experiment), r.overrides)
    assert cfg.train.steps == cfg.train.schedule_steps == r.steps == 300 + round(r.budget * ratio)
    assert r.copy_from == r.workdir.parent / "dense_pretrain"

  runs = studies.plan("lm_mature", tmp_path, [0, 1], [1500, 3000], parent_steps=2000)
  parents = [r for r in runs if r.arm == "dense_pretrain"]
  assert len(parents) == 2 and {r.workdir.parent.name for r in parents} == {"s0", "s1"}  # one per seed, all budgets
  assert len(runs) == 2 + 2 * 2 * 3
  for r in runs:
    cfg = config.apply_overrides(registry.get(r.experiment), r.overrides)
    assert cfg.train.steps == r.steps and cfg.train.schedule_steps == r.steps, r
    sched = optim.schedule(cfg.optim, cfg.train.schedule_steps)
    if r.arm == "dense_pretrain":
      assert r.steps == 2000 and cfg.optim.schedule == "constant"
      continue
    parent = next(p for p in parents if p.seed == r.seed)
    assert (r.copy_from or pathlib.Path(studies.upcycle_parent(r))) == parent.workdir
    pcfg = config.apply_overrides(registry.get(parent.experiment), parent.overrides)
    psched = optim.schedule(pcfg.optim, pcfg.train.schedule_steps)
    for step in (0, 10, 500, 1999, 2000):  # the arm's LR equals the parent's until the branch point
      np.testing.assert_allclose(sched(step), psched(step), rtol=1e-6)
    assert float(sched(r.steps)) == 0.0 and float(sched(r.steps - 50)) > 0  # cosine to zero at its own end
    extra = {"dense_continued": r.budget, "upcycled": r.budget, "dense_flops": round(r.budget * ratio)}[r.arm]
    assert r.steps == 2000 + extra
  # the table: upcycled against the dense arm that spent its FLOPs, paired by seed
  by = {(r.arm, r.budget, r.seed): r for r in runs}
  for s in (0, 1):
    _fake_run(studies, by["dense_pretrain", 0, s], {1000: 3.0, 2000: 2.5}, 1)
    for arm, end in (("dense_continued", 2.0), ("upcycled", 1.9 - 0.1 * s), ("dense_flops", 1.95)):
      r = by[arm, 1500, s]
      _fake_run(studies, r, {2000: 2.5, r.steps: end}, 2001 if arm == "upcycled" else 1)
  rows = {r["arm"]: r for r in studies.table([r for r in runs if r.budget in (0, 1500)], "lm_mature")}
  assert set(rows) == {"dense_continued", "upcycled", "dense_flops"}
  assert rows["upcycled"]["Δ vs FLOP-matched (paired)"] == "-0.100 ± 0.050", rows["upcycled"]
  assert rows["upcycled"]["FLOP-matched with"] == "dense_flops"
  assert rows["dense_continued"]["Δ vs FLOP-matched (paired)"] == ""
  assert rows["dense_flops"]["steps"] == 2000 + round(1500 * ratio)

  # CLIP: the sparse model from scratch given the upcycled arm's whole FLOPs (parent included), its own schedule
  clip_ratio = studies.flops_ratio("scenes_clip_dense_wsd_tiny", "scenes_clip_up_wsd_tiny")
  cm = {r.arm: r for r in studies.plan("clip_mature", tmp_path, [0], [1500], parent_steps=3000) if r.budget}
  assert set(cm) == {"dense_continued", "clip_up", "clip_up_dense_lr", "dense_flops", "sparse_flops"}
  sparse = config.apply_overrides(registry.get(cm["sparse_flops"].experiment), cm["sparse_flops"].overrides)
  assert sparse.init.upcycle_from == "" and sparse.optim.decay_start == 0
  assert sparse.train.steps == sparse.train.schedule_steps == round(3000 / clip_ratio + 1500)
  up, fast = (config.apply_overrides(registry.get(cm[a].experiment), cm[a].overrides) for a in ("clip_up", "clip_up_dense_lr"))
  assert fast.optim.lr == 2 * up.optim.lr  # the recipe's half LR, and the dense LR
  young = {r.arm: r for r in studies.plan("clip_up", tmp_path, [0], [1500])}
  assert young["sparse_flops"].steps == round(300 / clip_ratio + 1500)
  assert young["dense_flops"].steps == 300 + round(1500 * clip_ratio)


def test_studies_record_restores_finished_runs_and_retrains_only_a_needed_parent(tmp_path):
  """results/studies keeps configs and metrics (no checkpoints): a fresh clone reports from it and skips those
  runs; a parent whose child is unfinished is trained again only when its checkpoint is missing."""
  studies = _studies()
  root, record = tmp_path / "runs", tmp_path / "record"
  runs = studies.select(studies.plan("lm_upcycle", root, [0], [300]), ["dense_continued", "upcycled"])
  by = {r.arm: r for r in runs}
  _fake_run(studies, by["dense_pretrain"], {150: 4.0, 300: 3.0}, 1)
  (by["dense_pretrain"].workdir / "checkpoints" / "300").mkdir(parents=True)
  _fake_run(studies, by["dense_continued"], {150: 4.0, 300: 3.0, 450: 2.5, 600: 2.0}, 1)
  _fake_run(studies, by["upcycled"], {450: 2.4}, 301)  # cut short at step 450 of 600
  assert [r.arm for r in studies.todo(runs)] == ["upcycled"]  # its parent still has its checkpoint
  # a timings file from before caches were keyed by run_key: keyed by the run's path under this root
  (root / "lm_upcycle" / "timings.json").write_text(json.dumps(
    {str(by["dense_continued"].workdir): {"wall_s": 2.0, "cpu_s": 1.0}}))
  assert studies.save_record(runs, root, record, root / "lm_upcycle") == 3
  assert not list(record.rglob("checkpoints")) and (record / "lm_upcycle" / "timings.json").exists()

  root2 = tmp_path / "clone"
  runs2 = studies.select(studies.plan("lm_upcycle", root2, [0], [300]), ["dense_continued", "upcycled"])
  assert studies.restore_record(runs2, root2, record, root2 / "lm_upcycle") == 3
  for r, r2 in zip(runs, runs2):
    assert (r2.workdir / "metrics.jsonl").read_text() == (r.workdir / "metrics.jsonl").read_text()
  # the recorded time is found under the clone's other root too (and an entry added now keeps the old one)
  assert studies.read_cache(root2 / "lm_upcycle" / "timings.json") == {
    studies.run_key(runs2[1]): {"wall_s": 2.0, "cpu_s": 1.0}}
  studies.merge_json(root2 / "lm_upcycle" / "timings.json", studies.run_key(runs2[2]), {"wall_s": 3.0, "cpu_s": 2.0})
  assert json.loads((root2 / "lm_upcycle" / "timings.json").read_text()) == {
    "b300/s0/dense_continued": {"wall_s": 2.0, "cpu_s": 1.0}, "b300/s0/upcycled": {"wall_s": 3.0, "cpu_s": 2.0}}
  # the upcycled run resumes from nothing, so its parent (no checkpoint in the clone) trains again first
  assert [r.arm for r in studies.todo(runs2)] == ["dense_pretrain", "upcycled"]
  # a directory that exists is never touched by a restore
  (runs2[1].workdir / "metrics.jsonl").write_text("mine\n")
  assert studies.restore_record(runs2, root2, record, root2 / "lm_upcycle") == 0
  assert (runs2[1].workdir / "metrics.jsonl").read_text() == "mine\n"


def test_a_run_recorded_part_way_trains_again_from_its_parent_not_from_scratch(tmp_path, monkeypatch):
  """The record also keeps runs stopped part-way (their metrics, no checkpoints). On a fresh machine such a run is
  restored for the reports, and when the study goes on it must start again from a copy of its parent (retrained
  first, its checkpoint being gone too), not from step 0 in the restored directory, appending to its metrics."""
  studies = _studies()
  root, record = tmp_path / "runs", tmp_path / "record"
  runs = studies.select(studies.plan("lm_upcycle", root, [0], [300]), ["dense_continued"])
  by = {r.arm: r for r in runs}
  assert by["dense_continued"].copy_from == by["dense_pretrain"].workdir
  _fake_run(studies, by["dense_pretrain"], {150: 4.0, 300: 3.0}, 1)
  _fake_run(studies, by["dense_continued"], {150: 4.0, 300: 3.0, 450: 2.5}, 1)  # stopped at 450 of 600
  for r in runs:
    (r.workdir / "result.json").write_text(json.dumps({"status": "finished", "workdir": str(r.workdir)}))
  assert studies.save_record(runs, root, record, root / "lm_upcycle") == 2
  kept = {r.arm: (record / r.workdir.relative_to(root) / "result.json").exists() for r in runs}
  assert kept == {"dense_pretrain": True, "dense_continued": False}  # a part-way run's result is a stop's

  root2 = tmp_path / "clone"
  runs2 = studies.select(studies.plan("lm_upcycle", root2, [0], [300]), ["dense_continued"])
  assert studies.restore_record(runs2, root2, record, root2 / "lm_upcycle") == 2
  assert [studies.restored_copy(r) and studies.last_step(r.workdir) < r.steps for r in runs2] == [False, True]
  assert studies.last_step(runs2[1].workdir) == 450  # a --partial report still draws it
  assert [r.arm for r in studies.todo(runs2)] == ["dense_pretrain", "dense_continued"]
  child = ("import json, pathlib, sys\n"  # what the training child found in its directory, then a finished run
           "w, steps = pathlib.Path(sys.argv[1]), int(sys.argv[2])\n"
           "w.mkdir(parents=True, exist_ok=True)\n"
           "ck = sorted(int(p.name) for p in (w / 'checkpoints').glob('*')) if (w / 'checkpoints').exists() else []\n"
           "rows = [json.loads(x) for x in (w / 'metrics.jsonl').read_text().splitlines()] "
           "if (w / 'metrics.jsonl').exists() else []\n"
           "(w / 'found.json').write_text(json.dumps({'checkpoints': ck, 'rows': len(rows)}))\n"
           "(w / 'checkpoints' / str(steps)).mkdir(parents=True, exist_ok=True)\n"
           "with open(w / 'metrics.jsonl', 'a') as f:\n"
           "  f.write(json.dumps({'split': 'eval', 'step': steps, 'ce_loss': 1.0}) + '\\n')\n")
  monkeypatch.setattr(studies.execute_module, "command",
                      lambda r: [sys.executable, "-c", child, str(r.workdir), str(r.steps)])
  timings = tmp_path / "timings.json"  # the record's time: one whole parent and the continuation's part-way run
  timings.write_text(json.dumps({"b300/s0/dense_pretrain": {"wall_s": 90.0, "cpu_s": 80.0},
                                 "b300/s0/dense_continued": {"wall_s": 50.0, "cpu_s": 40.0}}))
  studies.execute(runs2, timings)
  parent, cont = (json.loads((r.workdir / "found.json").read_text()) for r in runs2)
  assert parent == {"checkpoints": [], "rows": 0}  # the parent trained in a clean directory
  assert cont["checkpoints"] == [300]  # the continuation resumed from the retrained parent's checkpoint ...
  assert cont["rows"] == 1  # ... with the parent's metrics, not the record's part-way run
  assert not any((r.workdir / studies.RESTORED).exists() for r in runs2)
  assert studies.todo(runs2) == []
  # each run's wall_s / cpu_s now count the one training behind its metrics (priced by tables and estimates); the
  # time the replaced histories cost is kept apart
  for key, (wall, cpu) in {"b300/s0/dense_pretrain": (90.0, 80.0), "b300/s0/dense_continued": (50.0, 40.0)}.items():
    t = json.loads(timings.read_text())[key]
    assert (t["earlier_wall_s"], t["earlier_cpu_s"]) == (wall, cpu) and 0 < t["cpu_s"] < 30
  # a directory with a checkpoint is never cleared, marker or not
  (runs2[1].workdir / studies.RESTORED).write_text("")
  assert not studies.fresh_start(runs2[1]) and (runs2[1].workdir / "metrics.jsonl").exists()


def test_study_caches_keep_every_entry_when_two_writers_share_a_root(tmp_path):
  """Two study invocations side by side (e.g. two arms) write the same timings.json / novel.json: each write
  re-reads the file under a lock, so neither loses the other's entries, and no temporary file is left."""
  import threading

  studies = _studies()
  path = tmp_path / "timings.json"

  def writer(tag):
    for i in range(150):
      studies.merge_json(path, f"{tag}{i}", {"wall_s": float(i)})

  threads = [threading.Thread(target=writer, args=(t,)) for t in "ab"]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  data = json.loads(path.read_text())
  assert set(data) == {f"{t}{i}" for t in "ab" for i in range(150)}
  assert data["b149"] == {"wall_s": 149.0}
  assert sorted(p.name for p in tmp_path.iterdir()) == [".timings.json.lock", "timings.json"]


def test_capacity_factor_table_pairs_with_dropless_and_counts_buffer_flops(tmp_path):
  """The capacity knob's table: each factor against dropless CLIP-UP of the same seed, the dropped fraction per
  tower from the train rows, training FLOPs with the capacity buffers counted (more than the routed FLOPs, by
  the hand count of the extra slots), and CPU-seconds per sparse step from the timings."""

  from moejax import checkpoint
  from moejax.layers import router
  from moejax.models import two_tower

  studies = _studies()
  runs = studies.plan("clip_up", tmp_path, [0, 1], [300])
  by = {(r.arm, r.seed): r for r in runs}
  for s in (0, 1):
    _fake_run(studies, by["dense_pretrain", s], {150: 4.0, 300: 3.0}, 1)
    _fake_run(studies, by["clip_up", s], {450: 2.4, 600: 2.0 + 0.1 * s}, 301)
    _fake_run(studies, by["clip_up_cf1.0", s], {450: 2.5, 600: 2.2 + 0.3 * s}, 301)
    with open(by["clip_up_cf1.0", s].workdir / "metrics.jsonl", "a") as f:  # drops: vision 10 / 20 %, text 0
      for step, v in ((302, 0.1), (303, 0.2)):
        f.write(json.dumps({"split": "train", "step": step, "moe/vision/1/dropped_fraction": v,
                            "moe/vision/3/dropped_fraction": v, "moe/text/1/dropped_fraction": 0.0}) + "\n")
  timings = {studies.run_key(by["clip_up_cf1.0", s]): {"wall_s": 1.0, "cpu_s": 600.0 + 60 * s} for s in (0, 1)}
  rows = {r["arm"]: r for r in studies.capacity_table(runs, timings)}
  assert list(rows) == ["clip_up", "clip_up_cf1.0"]
  cf = rows["clip_up_cf1.0"]
  assert cf["dispatch"] == "capacity 1.0" and cf["seeds"] == 2
  assert cf["Δ vs dropless (paired)"] == "0.300 ± 0.100", cf  # (2.2 - 2.0, 2.5 - 2.1)
  assert cf["dropped % vision"] == "15.0 ± 0.0" and cf["dropped % text"] == "0.0 ± 0.0", cf  # both seeds alike
  assert cf["CPU-s / step"] == "2.10 ± 0.10", cf  # (600, 660) CPU-s over 300 sparse steps
  cfg = checkpoint.read_config(by["clip_up_cf1.0", 0].workdir)
  v, t = cfg.clip.vision, cfg.clip.text
  n_img = 17  # 16 patches of the 16x16 scene at patch 4, and the class token
  extra = 0.0
  for tower, n_tok in ((v, n_img), (t, t.max_seq_len)):  # MoE in layers 1 and 3 of each tower, 8 experts, top-2
    slots = 8 * router.expert_capacity(1.0, n_tok, 8, 2) / n_tok
    extra += 6.0 * n_tok * (slots - 2) * 2 * tower.d_model * tower.d_ff * 2
  assert router.expert_capacity(1.0, n_img, 8, 2) == 5  # ceil(34 / 8): 40 slots for 34 picks
  routed = studies.curve(by["clip_up_cf1.0", 0])[2][-1]
  assert routed == studies.curve(by["clip_up", 0])[2][-1]  # the routed FLOPs do not see the buffer
  np.testing.assert_allclose(float(cf["train TFLOPs (buffer slots)"]),
                             (routed + 300 * cfg.data.batch_size * extra) / 1e12, atol=0.006)
  assert float(cf["train TFLOPs (buffer slots)"]) > float(rows["clip_up"]["train TFLOPs (buffer slots)"])
  assert two_tower.flops_per_example(cfg, slots=True) > two_tower.flops_per_example(cfg)


def test_stopping_a_study_stops_its_training_child_and_records_the_time_it_spent(tmp_path):
  """SIGTERM to the study reaches the running child as SIGTERM (moejax train checkpoints on it); the study then
  records the child's wall and CPU time under the run and exits 128 + 15, and its own handlers are restored."""
  import os
  import signal
  import threading
  import time

  studies = _studies()
  runs = studies.plan("lm_upcycle", tmp_path, [0], [300])[:1]
  ready, seen = tmp_path / "ready", tmp_path / "child_got_sigterm"
  child = ("import pathlib, signal, sys, time\n"
           "got = []\n"
           "signal.signal(signal.SIGTERM, lambda *a: got.append(1))\n"
           "x = 0\n"
           "while time.process_time() < 0.5:\n"  # 0.5 CPU-s spent before the study is stopped, however loaded
           "  x += 1\n"
           f"pathlib.Path({str(ready)!r}).write_text('')\n"
           "while not got:\n"
           "  x += 1\n"  # burn CPU until told to stop, as a training step would
           "import os\n"
           f"pathlib.Path({str(seen)!r}).write_text(str(os.getsid(0)))\n")
  studies.execute_module.command = lambda r: [sys.executable, "-c", child]

  def stop_the_study():
    while not ready.exists():
      time.sleep(0.01)
    time.sleep(0.2)
    os.kill(os.getpid(), signal.SIGTERM)

  before = signal.getsignal(signal.SIGTERM)
  threading.Thread(target=stop_the_study, daemon=True).start()
  timings = tmp_path / "timings.json"
  try:
    studies.execute(runs, timings)
    raise AssertionError("the study went on after SIGTERM")
  except SystemExit as e:
    assert e.code == 128 + signal.SIGTERM
  assert seen.exists()  # the child got SIGTERM and exited by its own handler, not killed
  assert int(seen.read_text()) != os.getsid(0)  # its own session: a terminal's Ctrl-C reaches only the study
  t = json.loads(timings.read_text())[studies.run_key(runs[0])]
  assert t["cpu_s"] >= 0.5 and t["wall_s"] >= 0.5, t  # the child's busy loop is counted
  assert signal.getsignal(signal.SIGTERM) is before


def test_lanes_train_independent_runs_side_by_side_and_a_run_only_after_the_runs_it_starts_from(tmp_path):
  """execute(lanes=2): never more than two children at once; the two seeds' parents run side by side (each waits
  to see the other start: one lane would stall it), and no arm starts before its parent (copied or upcycled) has
  finished. Every run is recorded with its time, and each child's output goes to its own log."""
  studies = _studies()
  runs = studies.plan("lm_mature", tmp_path / "runs", [0, 1], [1500])
  marks = tmp_path / "marks"
  (marks / "live").mkdir(parents=True)
  child = ("import json, os, pathlib, sys, time\n"
           "w, steps, marks, parents = pathlib.Path(sys.argv[1]), int(sys.argv[2]), pathlib.Path(sys.argv[3]), "
           "sys.argv[4:]\n"
           "name = '_'.join(w.parts[-3:])\n"
           "live = marks / 'live' / name\n"
           "live.write_text('')\n"
           "(marks / ('live_at_start_' + name)).write_text(str(len(list((marks / 'live').iterdir()))))\n"
           "(marks / ('parents_done_' + name)).write_text(str(all((pathlib.Path(p) / 'done').exists() "
           "for p in parents)))\n"
           "print('training', name, flush=True)\n"
           "if w.name == 'dense_pretrain':  # a barrier: both parents must be running at once\n"
           "  (marks / ('parent_started_' + name)).write_text('')\n"
           "  t0 = time.time()\n"
           "  while len(list(marks.glob('parent_started_*'))) < 2:\n"
           "    if time.time() - t0 > 120:\n"
           "      sys.exit(3)\n"
           "    time.sleep(0.01)\n"
           "w.mkdir(parents=True, exist_ok=True)\n"
           "(w / 'metrics.jsonl').write_text(json.dumps({'split': 'eval', 'step': steps, 'ce_loss': 1.0}) + '\\n')\n"
           "(w / 'done').write_text('')\n"
           "live.unlink()\n")
  ex = studies.execute_module
  old = ex.command
  ex.command = lambda r: [sys.executable, "-c", child, str(r.workdir), str(r.steps), str(marks), *ex._starts_from(r)]
  timings = tmp_path / "runs" / "lm_mature" / "p3000" / "timings.json"
  try:
    studies.execute(runs, timings, lanes=2)
  finally:
    ex.command = old
  assert studies.todo(runs) == []
  names = ["_".join(r.workdir.parts[-3:]) for r in runs]
  assert all((marks / f"parents_done_{n}").read_text() == "True" for n in names)
  assert max(int((marks / f"live_at_start_{n}").read_text()) for n in names) == 2
  assert set(json.loads(timings.read_text())) == {studies.run_key(r) for r in runs}
  logs = sorted(p.name for p in (timings.parent / "logs").iterdir())
  assert logs == sorted(studies.run_key(r).replace("/", "_") + ".log" for r in runs)
  assert (timings.parent / "logs" / "b0_s1_dense_pretrain.log").read_text() == "training p3000_s1_dense_pretrain\n"


def _two_lanes(tmp_path, then: str):
  """Two seeds' parents (lm_upcycle +300) and a training-child script that marks ready/<run> when it starts, runs
  `then` (its source, or "" for nothing), then burns CPU until SIGTERM and marks ready/<run>.stopped."""
  studies = _studies()
  runs = studies.plan("lm_upcycle", tmp_path, [0, 1], [300])
  ready = tmp_path / "ready"
  ready.mkdir()
  child = ("import pathlib, signal, sys\n"
           "got = []\n"
           "signal.signal(signal.SIGTERM, lambda *a: got.append(1))\n"
           f"ready = pathlib.Path({str(ready)!r})\n"
           "(ready / sys.argv[1]).write_text('')\n"
           f"{then}"
           "while not got:\n"
           "  pass\n"
           "(ready / (sys.argv[1] + '.stopped')).write_text('')\n")
  return studies, runs, ready, lambda r: [sys.executable, "-c", child, studies.run_key(r).replace("/", "_")]


def test_stopping_a_study_with_two_lanes_stops_both_children_and_starts_nothing_more(tmp_path):
  """SIGTERM with two runs in flight: both children get SIGTERM (and checkpoint, in moejax train), both runs'
  time is recorded, no further run starts, and the study exits 128 + 15."""
  import os
  import signal
  import threading
  import time

  studies, runs, ready, command = _two_lanes(tmp_path, "")
  ex = studies.execute_module
  old = ex.command
  ex.command = command

  def stop_the_study():
    while len(list(ready.iterdir())) < 2:
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=stop_the_study, daemon=True).start()
  timings = tmp_path / "timings.json"
  try:
    studies.execute(runs, timings, lanes=2)
    raise AssertionError("the study went on after SIGTERM")
  except SystemExit as e:
    assert e.code == 128 + signal.SIGTERM
  finally:
    ex.command = old
  both = {"b300_s0_dense_pretrain", "b300_s1_dense_pretrain"}  # the first two runs of the plan that need nothing
  assert {p.name for p in ready.iterdir()} == both | {f"{n}.stopped" for n in both}
  assert set(json.loads(timings.read_text())) == {n.replace("_", "/", 2) for n in both}


def test_a_failed_child_stops_the_other_lane_and_the_study_raises_its_error(tmp_path):
  """lanes=2: one run fails while the other trains; the other gets SIGTERM (it would checkpoint), nothing more
  starts, both runs' time is recorded, and the study raises the failed child's CalledProcessError."""
  import subprocess

  studies, runs, ready, command = _two_lanes(
    tmp_path, "if 's1' in sys.argv[1]:\n  while not (ready / 'b300_s0_dense_pretrain').exists():\n    pass\n  sys.exit(3)\n")
  ex = studies.execute_module
  old = ex.command
  ex.command = command
  timings = tmp_path / "timings.json"
  try:
    studies.execute(runs, timings, lanes=2)
    raise AssertionError("a failed run went unnoticed")
  except subprocess.CalledProcessError as e:
    assert e.returncode == 3
  finally:
    ex.command = old
  assert {p.name for p in ready.iterdir()} == {"b300_s0_dense_pretrain", "b300_s1_dense_pretrain",
                                               "b300_s0_dense_pretrain.stopped"}
  assert set(json.loads(timings.read_text())) == {"b300/s0/dense_pretrain", "b300/s1/dense_pretrain"}


def test_a_niced_study_runs_its_training_child_at_the_same_niceness(tmp_path):
  """The child runs in its own session; under Linux's scheduler autogroups that is its own scheduling group, where
  the study's `nice` would not count against other sessions. The study gives the child's group its niceness."""
  import pathlib
  import subprocess

  scripts = pathlib.Path(__file__).resolve().parent.parent / "scripts"
  child = "import os; print(os.getsid(0), open(f'/proc/{os.getpid()}/autogroup').read().split()[-1])"
  code = ("import os, sys\n"
          f"sys.path.insert(0, {str(scripts)!r})\n"
          "from studylib import execute\n"
          "nice = os.nice(7)\n"  # 7 more than whatever the test runner runs at
          f"rc = execute.train_child([sys.executable, '-c', {child!r}])[0]\n"
          "print(os.getsid(0), rc, nice)\n")
  if not pathlib.Path("/proc/self/autogroup").exists():  # a kernel without autogroups: nice works as it is
    return
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr
  (child_sid, child_nice), (study_sid, rc, study_nice) = (line.split() for line in out.stdout.splitlines())
  assert rc == "0" and child_sid != study_sid  # a session (and autogroup) of its own ...
  assert child_nice == study_nice and int(study_nice) >= 7  # ... at the study's niceness


def test_docs_study_tables_equal_the_generator():
  """Every study table in docs/results.md, and README's summary of them, is the one `scripts/studies.py STUDY
  --write-docs` makes from the stored record (results/studies); every generated block in the doc belongs to a table
  the record still makes."""
  import pathlib
  import re

  from moejax import report

  _studies()  # scripts/ on sys.path
  from studylib import docs

  root = pathlib.Path(__file__).resolve().parent.parent
  text = docs.DOC.read_text()
  with docs.restored(root / "results" / "studies") as studies:
    made = {name: block for study in docs.STUDIES for name, block in docs.study_tables(study, studies).items()}
    made.update(docs.verdict_tables(studies))
    readme_made = docs.readme_table(studies)
  for name, block in made.items():
    got = report.doc_block(text, docs.GENERATOR, name)
    if got is None and name.startswith(("lm_mature", "clip_mature")):
      continue  # a study in progress: its table joins the doc when it has runs worth reading
    assert got is not None, f"docs/results.md has lost its generated {name!r} block"
    assert got == block, f"docs/results.md's {name!r} table differs from the record: run scripts/studies.py --write-docs"
  placed = re.findall(re.escape(f"<!-- generated by {docs.GENERATOR}: ") + r"(.+?) -->", text)
  assert placed and set(placed) <= set(made), set(placed) - set(made)
  readme = report.doc_block(docs.README.read_text(), docs.GENERATOR, "readme")
  assert readme == readme_made, "README's study summary differs from the record"


def test_verdict_rule_decides_at_three_standard_errors():
  """studylib/verdicts.py: Δ = arm - reference (negative: the arm is better); |mean| >= 3 SE over >= 3 seeds
  decides, under it asks for five seeds, fewer than three pairs is pending."""
  _studies()
  from studylib import verdicts

  assert verdicts.verdict([-0.030, -0.031, -0.029]) == "**reproduces**"  # SE 0.0006: 50 SE
  assert verdicts.verdict([0.05, 0.06, 0.04]).startswith("**contradicted**")
  assert verdicts.verdict([-0.03, 0.01, -0.02]).startswith("unresolved at 3 seeds")  # mean -0.013, SE 0.012
  assert verdicts.verdict([-0.03, 0.01, -0.02, 0.0, 0.01]) == "no resolved difference at 5 seeds"
  assert verdicts.verdict([-0.1, -0.1]) == "pending (2 of 3 seeds)"
  # 3 SE exactly decides: mean -0.03, deltas spread so that SE = 0.01
  d = [-0.03 - 0.01 * 3**0.5, -0.03, -0.03 + 0.01 * 3**0.5]
  assert abs(verdicts.mean_se(d)[1] - 0.01) < 1e-12 and verdicts.verdict(d) == "**reproduces**"


def test_a_verdict_row_names_its_command_and_the_recorded_cost_of_exactly_its_runs(tmp_path):
  """A row's CPU-hours are its two arms at its budgets for its seeds and the parents they start from: a mature
  parent (budget 0) counts in every row that needs it, other arms and budgets and seeds never."""
  _studies()
  from studylib import plan, verdicts

  runs = plan.plan("lm_mature", tmp_path, [0, 1, 2, 3], [1500, 3000])
  timings = {f"b{r.budget}/s{r.seed}/{r.arm}": {"cpu_s": 3600.0 * (1 + r.seed)} for r in runs}
  # seeds 0 and 3 at +1,500: upcycled + dense_continued + the parent, each (1 + seed) hours
  assert verdicts.cpu_hours(runs, [1500], ("upcycled", "dense_continued"), [0, 3], timings) == 3 * 1 + 3 * 4
  # the growth row reads both budgets: the parent once, two arms twice
  assert verdicts.cpu_hours(runs, [1500, 3000], ("upcycled", "dense_continued"), [1], timings) == 5 * 2
  assert verdicts.cpu_hours(runs, [3000], ("upcycled", "dense_flops"), [2], {}) == 0.0  # nothing recorded
  assert verdicts.command("lm_mature", [1500], ("upcycled", "dense_flops"), [0, 1, 2]) == (
    "`scripts/studies.sh lm_mature --budgets 1500 --arms upcycled dense_flops`")
  assert verdicts.command("clip_up", [300, 1500], ("clip_up", "dense_continued"), [0, 1, 2, 3, 4]).endswith(
    "--arms clip_up dense_continued --seeds 0 1 2 3 4`")


def test_the_more_seeds_plan_covers_exactly_the_unresolved_rows_and_prices_them_from_finished_seeds(tmp_path):
  """verdicts.more_seeds: for the unresolved rows, commands training seeds 3 and 4 of exactly the arms each budget
  needs (budgets needing the same arms share one), priced at the mean CPU time of each run's finished seeds, a
  parent shared by the budgets priced once; ">=" when a run has no finished seed to price it. Decided rows ask for
  nothing."""
  studies = _studies()
  from studylib import verdicts

  runs = studies.plan("lm_mature", tmp_path, [0, 1, 2], [1500, 3000])
  noise = [-0.03, 0.01, -0.02]  # a Δ under 3 SE (mean -0.013, SE 0.012)

  def write(finals):
    for r in runs:
      _fake_run(studies, r, {r.steps: finals(r)}, r.start + 1 if r.arm != "dense_pretrain" else 1)

  def finals(r, up1500=None):
    dense = 2.0 if r.budget == 1500 else 1.9
    up = dense + noise[r.seed] if r.budget == 1500 else dense - 0.10
    up = up1500 if up1500 is not None and r.budget == 1500 else up
    flops = up + (0.05 if r.budget == 1500 else noise[r.seed])  # +3,000: upcycled - dense_flops unresolved
    return {"dense_pretrain": 3.0, "dense_continued": dense, "upcycled": up, "dense_flops": flops}[r.arm]

  write(finals)
  timings = {"lm_mature": {f"b{r.budget}/s{r.seed}/{r.arm}": {"cpu_s": 3600.0 * (1 + r.seed)} for r in runs}}
  unresolved = [(row["budget"], row["Δ eval loss"]) for row in verdicts.rows({"lm_mature": runs}, timings)
                if row["verdict"].startswith("unresolved")]
  assert unresolved == [("+1500", "upcycled - dense_continued"), ("+3000", "upcycled - dense_flops")]
  plans = verdicts.more_seeds({"lm_mature": runs}, timings)
  assert [p["train"] for p in plans] == [
    "`scripts/studies.sh lm_mature --budgets 1500 --arms dense_continued upcycled --seeds 3 4`",
    "`scripts/studies.sh lm_mature --budgets 3000 --arms upcycled dense_flops --seeds 3 4`"]
  # each run 2 h a seed (seeds 0-2 at 1, 2, 3 h), two more seeds: the parent and two arms, then two arms
  assert [p["CPU-hours (estimated)"] for p in plans] == ["12.0", "8.0"]
  assert all(p["seeds so far"] == 3 for p in plans)
  for s in (0, 1, 2):
    del timings["lm_mature"][f"b1500/s{s}/upcycled"]
  assert verdicts.more_seeds({"lm_mature": runs}, timings)[0]["CPU-hours (estimated)"] == ">= 8.0"
  write(lambda r: finals(r, up1500=1.9))  # +1,500 decided; +3,000's equal-FLOPs row still asks
  assert [p["train"] for p in verdicts.more_seeds({"lm_mature": runs}, timings)] == [plans[1]["train"]]
  write(lambda r: finals(r, up1500=1.9) if r.arm != "dense_flops" or r.budget == 1500 else 1.9)
  assert verdicts.more_seeds({"lm_mature": runs}, timings) == []  # every row decided: nothing to ask for


def test_a_stored_run_finds_its_parent_wherever_the_store_keeps_it(tmp_path):
  """report.stored_parent: a run's `init.upcycle_from` names a path of the machine that trained it; in a store
  (results/, or a scratch restore of it) the parent is the nearest ancestor's match of that path's last
  components: beside the run, or shared by several budgets a few levels up (lm_mature: p3000/s0/dense_pretrain for
  p3000/b1500/s0/upcycled). Without it the upcycled run's parent steps would be charged at the MoE's cost."""
  from moejax import report

  run = tmp_path / "p3000" / "b1500" / "s0" / "upcycled"
  gone = pathlib.Path("/gone/study-runs/lm_mature/p3000/s0/dense_pretrain")
  assert report.stored_parent(run, gone) == run.parent / "dense_pretrain"  # nothing stored: the caller sees it missing
  shared = tmp_path / "p3000" / "s0" / "dense_pretrain"
  shared.mkdir(parents=True)
  (shared / "config.json").write_text("{}")
  assert report.stored_parent(run, gone) == shared
  beside = run.parent / "dense_pretrain"
  beside.mkdir(parents=True)
  (beside / "config.json").write_text("{}")
  assert report.stored_parent(run, gone) == beside  # the nearest wins


def test_a_study_stopped_before_its_first_eval_records_where_it_got_and_its_time(tmp_path, monkeypatch):
  """A long parent stopped (SIGTERM) before its first eval has logged train rows only: the invocation still writes
  its provenance row (the run trained from nothing to its last logged step) and copies the study's timings and
  provenance into the record, so a fresh machine keeps the time that was spent."""
  import importlib.util
  import os
  import signal
  import threading
  import time

  studies = _studies()
  spec = importlib.util.spec_from_file_location("studies_script", studies.execute_module.__file__.replace(
    "studylib/execute.py", "studies.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  root, record, ready = tmp_path / "runs", tmp_path / "record", tmp_path / "ready"
  child = ("import json, pathlib, signal, sys\n"
           "got = []\n"
           "signal.signal(signal.SIGTERM, lambda *a: got.append(1))\n"
           "w = pathlib.Path(sys.argv[1])\n"
           "w.mkdir(parents=True, exist_ok=True)\n"
           "(w / 'metrics.jsonl').write_text(json.dumps({'split': 'train', 'step': 7, 'ce_loss': 5.0}) + '\\n')\n"
           f"pathlib.Path({str(ready)!r}).write_text('')\n"
           "while not got:\n"
           "  pass\n")
  monkeypatch.setattr(studies.execute_module, "command", lambda r: [sys.executable, "-c", child, str(r.workdir)])

  def stop_the_study():
    while not ready.exists():
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)

  threading.Thread(target=stop_the_study, daemon=True).start()
  with pytest.raises(SystemExit) as e:
    script.main(["lm_upcycle", "--seeds", "0", "--budgets", "300", "--arms", "dense_pretrain", "--root", str(root),
                 "--record", str(record), "--img", str(tmp_path / "img")])
  assert e.value.code == 128 + signal.SIGTERM
  rows = [json.loads(x) for x in (root / "lm_upcycle" / "provenance.jsonl").read_text().splitlines()]
  assert [r["runs_trained_from_to_step"] for r in rows] == [{"b300/s0/dense_pretrain": [-1, 7]}]
  assert (record / "lm_upcycle" / "provenance.jsonl").read_text() == (root / "lm_upcycle" / "provenance.jsonl").read_text()
  t = json.loads((record / "lm_upcycle" / "timings.json").read_text())
  assert list(t) == ["b300/s0/dense_pretrain"] and t["b300/s0/dense_pretrain"]["cpu_s"] > 0
  assert not (record / "lm_upcycle" / "b300").exists()  # no eval yet: nothing of the run itself to show


def test_a_single_training_child_is_stopped_with_its_study_and_its_time_returned(tmp_path):
  """train_child (peft_study's one run at a time): SIGTERM to the study reaches the child as SIGTERM (moejax train
  checkpoints and exits 0), the call returns the child's status, its time and the signal, and the study's own
  handlers are back afterwards."""
  import os
  import signal
  import threading
  import time

  studies = _studies()
  ready = tmp_path / "ready"
  child = ("import pathlib, signal\n"
           "got = []\n"
           "signal.signal(signal.SIGTERM, lambda *a: got.append(1))\n"
           f"pathlib.Path({str(ready)!r}).write_text('')\n"
           "while not got:\n"
           "  pass\n")

  def stop_the_study():
    while not ready.exists():
      time.sleep(0.01)
    os.kill(os.getpid(), signal.SIGTERM)

  before = signal.getsignal(signal.SIGTERM)
  threading.Thread(target=stop_the_study, daemon=True).start()
  rc, wall, cpu, stopped = studies.execute_module.train_child([sys.executable, "-c", child])
  assert (rc, stopped) == (0, signal.SIGTERM) and wall > 0 and cpu > 0
  assert signal.getsignal(signal.SIGTERM) is before


def test_the_cost_table_prices_each_run_by_the_steps_it_trained_itself_and_keeps_retrains_apart(tmp_path):
  """CPU-s per step: a parent over all its steps, a continuation (copied parent) and an upcycled run over the steps
  after the parent's last one, a FLOP-matched run over its own length; the total adds every recorded run, part-way
  ones included, and shows a retrain's replaced time separately."""
  studies = _studies()
  runs = studies.plan("lm_upcycle", tmp_path, [0, 1], [300])
  by = {(r.arm, r.seed): r for r in runs}
  for r in runs:
    if r.seed == 0 or r.arm == "dense_pretrain":
      _fake_run(studies, r, {r.steps: 3.0}, 1)
  _fake_run(studies, by["upcycled", 1], {by["upcycled", 1].start + 150: 3.0}, 301)  # stopped part-way: not in its arm's row
  own = {"dense_pretrain": 300, "dense_continued": 300, "upcycled": 300, "dense_flops": 403}
  assert {r.arm: studies.own_steps(r) for r in runs if r.seed == 0} == own
  timings = {studies.run_key(r): {"wall_s": 2.0 * own[r.arm], "cpu_s": 1.0 * own[r.arm]} for r in runs
             if r.seed == 0 or r.arm == "dense_pretrain"}
  timings[studies.run_key(by["dense_pretrain", 1])] = {"wall_s": 900.0, "cpu_s": 600.0, "earlier_wall_s": 10.0,
                                                      "earlier_cpu_s": 360.0}
  timings[studies.run_key(by["upcycled", 1])] = {"wall_s": 100.0, "cpu_s": 72.0}
  rows = {r["arm"]: r for r in studies.cost_table(runs, "LM", timings)}
  assert rows["dense_pretrain"]["CPU-s / step"] == "1.50 ± 0.50" and rows["dense_pretrain"]["runs timed"] == "2 of 2"
  assert {a: rows[a]["CPU-s / step"] for a in ("dense_continued", "upcycled", "dense_flops")} == dict.fromkeys(
    ("dense_continued", "upcycled", "dense_flops"), "1.00")
  assert rows["upcycled"]["runs timed"] == "1 of 2"
  total = rows["**all** (5 of 8 runs finished)"]
  cpu = 300 + 600 + 300 + 300 + 403 + 72
  assert total["runs timed"] == "6 of 8"
  assert total["CPU-hours"] == f"**{cpu / 3600:.2f}** (+ {360 / 3600:.2f} in trainings run again)"
  assert total["wall-hours"] == f"{(2 * (300 + 300 + 300 + 403) + 900 + 100) / 3600:.2f}"


def test_the_clip_mature_figures_are_drawn_under_their_own_names(tmp_path):
  """clip_mature's figures (curves by steps and FLOPs, the paired advantage, retrieval bars, the parents' curve)
  go to study_clip_mature_*.png: none overwrites the young-parent study's (study_clip_up_*)."""
  studies = _studies()
  runs = studies.plan("clip_mature", tmp_path / "runs", [0, 1], [1500])
  for r in runs:
    evals = [1500, 3000] if r.arm == "dense_pretrain" else [r.steps - 500, r.steps]
    _fake_run(studies, r, {}, 1)  # its config; the metrics below add CLIP's retrieval keys
    first = 1 if r.arm == "dense_pretrain" or r.copy_from is None and not studies.upcycle_parent(r) else r.start + 1
    rows = [{"split": "train", "step": first, "ce_loss": 9.0}]
    rows += [{"split": "eval", "step": s, "ce_loss": 1.0 - s / 1e4 - 0.01 * r.seed, "loss": 1.0,
              "t2i_recall@1": 0.5, "i2t_recall@1": 0.4, "zeroshot_top1": 0.3} for s in evals]
    (r.workdir / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
  img = tmp_path / "img"
  img.mkdir()
  paths = studies.figures(runs, "clip_mature", img) + [studies.parent_figure(runs, "clip_mature", img)]
  assert sorted(p.name for p in paths) == sorted(f"study_clip_mature_{n}.png" for n in (
    "loss_vs_steps", "loss_vs_flops", "advantage", "retrieval", "parent"))
  assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
