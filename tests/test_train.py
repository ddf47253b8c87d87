"""Training: sharded == single device, kill -9 and resume == uninterrupted, damaged checkpoint fallback,
the final checkpoint saved before the final eval, tiny twins train, CLI errors exit 2 with one line."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import study_twins

from moejax import checkpoint, config, registry, sharding, train

TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64", "data.seq_len=32",
        "data.batch_size=8", "train.eval_steps=1", "train.log_every=1", "optim.warmup_steps=2"]


def _cfg(*extra):
  return registry.get("lm_dense_tiny", TINY + list(extra))


def _params_np(state):
  return {k: np.asarray(v) for k, v in sharding.flatten(state["params"]).items()}


def _assert_trees_close(a, b, atol, rtol=0.0):
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=rtol, err_msg=k)


@pytest.mark.parametrize("mesh_kw, moe", [
  (dict(data=2, fsdp=2, tensor=2), False),
  (dict(data=2, fsdp=2, tensor=2), True),
])
def test_sharded_training_matches_single_device(tmp_path, mesh_kw, moe):
  extra = ["train.steps=3", "train.eval_every=100", "train.checkpoint_every=100"]
  if moe:
    extra += ["model.moe.num_experts=4", "model.moe.every=2"]
  cfg = _cfg(*extra)
  single = sharding.make_mesh(config.MeshConfig(data=1), devices=jax.devices()[:1])
  sharded = sharding.make_mesh(config.MeshConfig(**mesh_kw))
  r1 = train.train(cfg, tmp_path / "single", mesh=single, progress=False)
  r8 = train.train(cfg, tmp_path / "sharded", mesh=sharded, progress=False)
  assert r1["step"] == r8["step"] == 3
  _assert_trees_close(_params_np(r1["state"]), _params_np(r8["state"]), atol=1e-5)
  rows1 = [r for r in _rows(tmp_path / "single") if r["split"] == "train"]
  rows8 = [r for r in _rows(tmp_path / "sharded") if r["split"] == "train"]
  np.testing.assert_allclose([r["loss"] for r in rows1], [r["loss"] for r in rows8], rtol=1e-5)


def _rows(d):
  from moejax import metrics

  return metrics.read_jsonl(d)


def test_loss_decreases_and_outputs_exist(tmp_path):
  cfg = _cfg("train.steps=30", "train.eval_every=15", "train.checkpoint_every=15", "optim.lr=1e-2")
  r = train.train(cfg, tmp_path, progress=False)
  rows = _rows(tmp_path)
  ev = [x for x in rows if x["split"] == "eval"]
  tr = [x["ce_loss"] for x in rows if x["split"] == "train"]
  assert len(ev) == 2 and ev[1]["ce_loss"] < np.log(256) - 1.0  # well below uniform over bytes
  assert np.mean(tr[-5:]) < np.mean(tr[:5]) - 1.0
  assert r["eval"]["perplexity"] == pytest.approx(np.exp(r["eval"]["ce_loss"]), rel=1e-6)
  assert (tmp_path / "config.json").exists() and list((tmp_path / "tb").iterdir())
  assert checkpoint.Manager(tmp_path).all_steps() == [15, 30]
  assert checkpoint.read_config(tmp_path) == cfg
  train_rows = [x for x in rows if x["split"] == "train"]
  assert all("throughput/tokens_per_s" in x and "throughput/mfu" in x for x in train_rows)


def test_the_final_checkpoint_is_written_before_the_final_eval(tmp_path, monkeypatch):
  cfg = _cfg("train.steps=2", "train.eval_every=100", "train.checkpoint_every=100")
  real = train.run_eval

  def failing(*a, **kw):
    raise RuntimeError("eval failed")

  monkeypatch.setattr(train, "run_eval", failing)
  with pytest.raises(RuntimeError, match="eval failed"):
    train.train(cfg, tmp_path / "run", progress=False)
  assert checkpoint.step_numbers(tmp_path / "run") == [2]  # the last step survives the failed eval
  # re-running the finished run trains nothing and redoes only the eval
  monkeypatch.setattr(train, "run_eval", real)
  monkeypatch.setattr(train, "make_train_step", lambda s: lambda *a: pytest.fail("a finished run trained again"))
  r = train.train(cfg, tmp_path / "run", progress=False)
  assert r["status"] == "completed" and r["step"] == 2 and "ce_loss" in r["eval"]
  assert json.loads((tmp_path / "run" / "result.json").read_text())["eval"] == r["eval"]


def test_damaged_newest_checkpoint_falls_back(tmp_path, capsys):
  base = ["train.eval_every=100", "train.checkpoint_every=4", "train.schedule_steps=10"]  # same LR clock
  ref = train.train(_cfg("train.steps=10", *base), tmp_path / "ref", progress=False)
  run = tmp_path / "run"
  train.train(_cfg("train.steps=8", *base), run, progress=False)
  assert checkpoint.Manager(run).all_steps() == [4, 8]
  for f in (run / "checkpoints" / "8" / "state").rglob("*"):  # damage step 8's array data
    if f.is_file() and f.stat().st_size > 0 and "metadata" not in f.name:
      f.write_bytes(b"\0" * 7)
  r = train.train(_cfg("train.steps=10", *base), run, progress=False)
  out = capsys.readouterr().err
  assert "checkpoint step 8" in out and "damaged" in out and "falling back" in out
  assert (run / "checkpoints_damaged" / "8").is_dir()  # moved aside, not deleted
  assert r["step"] == 10
  _assert_trees_close(_params_np(ref["state"]), _params_np(r["state"]), atol=0)


def _cli(args, **kw):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable, "-m", "moejax.cli", *args], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, **kw)


@pytest.mark.slow
def test_kill9_and_resume_equals_uninterrupted(tmp_path):
  args = ["train", "lm_dense_tiny", *TINY, "train.steps=300", "train.checkpoint_every=50", "train.eval_every=1000",
          "train.log_every=50", "--no-progress"]
  ref = _cli([*args, "--workdir", str(tmp_path / "ref")])
  assert ref.wait(timeout=600) == 0, ref.stderr.read()
  run = tmp_path / "run"
  p = _cli([*args, "--workdir", str(run)])
  deadline = time.time() + 300
  while time.time() < deadline and not (run / "checkpoints" / "50").is_dir():
    time.sleep(0.02)
  p.send_signal(signal.SIGKILL)
  assert p.wait(timeout=60) == -signal.SIGKILL
  steps = checkpoint.Manager(run).all_steps()
  assert steps and steps[-1] < 300, f"the kill landed too late to test anything: {steps}"
  p = _cli([*args, "--workdir", str(run)])
  out, err = p.communicate(timeout=600)
  assert p.returncode == 0, err
  assert "resuming at step" in err + out
  cfg = checkpoint.read_config(run)
  s = train.setup(cfg, sharding.make_mesh(cfg.mesh))
  a = checkpoint.Manager(tmp_path / "ref").restore_latest(s.abstract_state)
  b = checkpoint.Manager(run).restore_latest(s.abstract_state)
  assert a[0] == b[0] == 300
  _assert_trees_close(_params_np(a[1]), _params_np(b[1]), atol=0)


@pytest.mark.parametrize("args, message", [
  (["train", "lm_dens_tiny"], "unknown experiment 'lm_dens_tiny'; did you mean 'lm_dense_tiny'"),
  (["train", "lm_dense_tiny", "model.num_layer=2"], "unknown key 'model.num_layer'; did you mean"),
  (["train", "lm_dense_tiny", "train.steps=ten"], "train.steps: expected int, got str 'ten'"),
  (["train", "lm_dense_tiny", "data.batch_size=6", "mesh.data=4", "mesh.fsdp=2"],
   "not divisible by the 8 data-parallel shards"),
  (["experiments", "show", "nope_tiny"], "unknown experiment 'nope_tiny'"),
])
def test_bad_cli_input_exits_2_with_one_line(args, message, tmp_path):
  p = _cli([*args, "--workdir", str(tmp_path)] if args[0] == "train" else args)
  out, err = p.communicate(timeout=120)
  assert p.returncode == 2, (out, err)
  lines = [line for line in err.strip().splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("moejax: error: ") and message in lines[0], err
  assert "Traceback" not in err


# A twin that differs from a trained one only in fields that do not change the program its twin compiles (the
# learning rate, where it is upcycled from: twins start from random params) is checked field by field instead.
SAME_PROGRAM = {"clip_sparse_scratch_tiny": ("clip_up_tiny", {"optim.lr", "init.continue_step", "init.upcycle_from"})}
TINY_TWINS = [n for n in registry.names()
              if n.endswith("_tiny") and n not in study_twins.GROUPED_TWINS and n not in SAME_PROGRAM]


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
  return out


@pytest.mark.parametrize("name", sorted(SAME_PROGRAM))
def test_same_program_twin_differs_only_in_the_named_fields(name):
  other, fields = SAME_PROGRAM[name]
  assert other in TINY_TWINS
  a, b = (_flat(config.to_dict(registry.get(n))) for n in (name, other))
  assert {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)} <= fields | {"name"}


@pytest.mark.parametrize("name", TINY_TWINS)
def test_tiny_twin_trains_two_steps(name, tmp_path):
  cfg = registry.get(name, ["train.steps=2", "train.eval_steps=1", "train.eval_every=2", "train.checkpoint_every=2"])
  if cfg.init.upcycle_from:  # the upcycling path itself is tested in test_upcycle*; here: the twin trains
    cfg = config.derive(cfg, {"init.upcycle_from": ""})
  if cfg.ttmm.clusters:  # a TTMM bank: 4 experts on a few short documents (the build itself: test_ttmm.py)
    cfg = config.derive(cfg, {"ttmm.max_docs": 8, "ttmm.doc_tokens": 64})
  if cfg.peft.method != "none":  # a fine-tuning twin needs a base run: random params, saved as import-hf would
    base = config.derive(cfg, {"peft.method": "none", "ttmm.clusters": 0})
    s = train.setup(base)
    m = checkpoint.Manager(tmp_path / "base")
    m.save(0, train.params_only_state(s, sharding.create_params(jax.random.key(0), s.specs, s.mesh)), base, force=True)
    m.close()
    cfg = config.derive(cfg, {"init.peft_from": str(tmp_path / "base")})
    tmp_path = tmp_path / "ft"
  r = train.train(cfg, tmp_path, progress=False)
  if cfg.ttmm.clusters:
    assert r["step"] == 2 and len(r["final_loss_per_expert"]) == 4 and np.isfinite(r["final_loss_per_expert"]).all()
    return
  assert r["step"] == 2 and np.isfinite(r["eval"]["loss"])




def test_overrides_may_follow_the_flags():
  """`moejax train NAME --workdir DIR a.b=v` (the README's order) as well as overrides before the flags."""
  from moejax import cli

  args, _ = cli.parse(["train", "lm_dense_tiny", "a.b=1", "--workdir", "x", "train.steps=3", "--no-progress",
                       "optim.lr=1e-3"])
  assert args.overrides == ["a.b=1", "train.steps=3", "optim.lr=1e-3"] and args.workdir == "x" and args.no_progress
  args, _ = cli.parse(["upcycle", "--from", "a", "--exp", "b", "m.x=1", "--dry-run", "m.y=2"])
  assert args.overrides == ["m.x=1", "m.y=2"] and args.dry_run
  with pytest.raises(SystemExit):  # a stray word is still an error
    cli.parse(["train", "lm_dense_tiny", "--workdir", "x", "stray"])


def test_one_line_errors_keep_every_listed_problem():
  from moejax import cli

  e = ValueError("cannot upcycle the dense model into the target:\n  - model.d_ff: dense 64 != target 48\n"
                 "  - model.vocab_size: dense 256 != target 128\n")
  assert cli.one_line(e) == ("cannot upcycle the dense model into the target: model.d_ff: dense 64 != target 48; "
                             "model.vocab_size: dense 256 != target 128")
  assert cli.one_line(KeyError()) == "KeyError" and cli.one_line(ValueError("plain")) == "plain"


# ----------------------------------------------------------------------------------------------------------
# Gradient accumulation: what it preserves and what it changes
# ----------------------------------------------------------------------------------------------------------


def _one_device():
  return sharding.make_mesh(config.MeshConfig(data=1), devices=jax.devices()[:1])


def _steps(cfg, batch, n=3):
  """`n` train steps on the same batch from the same init; -> (params, per-step metrics)."""
  s = train.setup(cfg, _one_device())
  state = train.init_state(s, jax.random.key(0))
  step = train.make_train_step(s)
  ms = []
  for _ in range(n):
    state, m = step(state, jax.device_put(batch, s.batch_sharding))
    ms.append(jax.tree.map(np.asarray, m))
  return _params_np(state), ms


def _lm_batch(cfg, seed=0):
  return {"tokens": np.random.default_rng(seed).integers(0, 256, (cfg.data.batch_size, cfg.data.seq_len + 1))
          .astype(np.int32)}


def test_grad_accum_dense_equals_one_big_batch():
  """Dense LM: accum=2 over two half-batches is the same step as one full batch (loss, gradient, params)."""
  cfg = _cfg("optim.warmup_steps=0")
  batch = _lm_batch(cfg)
  p1, m1 = _steps(cfg, batch)
  p2, m2 = _steps(config.derive(cfg, {"optim.grad_accum": 2}), batch)
  for a, b in zip(m1, m2):
    np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-5)
    np.testing.assert_allclose(a["grad_norm"], b["grad_norm"], rtol=1e-5)
  _assert_trees_close(p1, p2, atol=1e-5)


def _half_grad_stats(task_loss, params, halves):
  """Mean over micro-batches of (loss metrics, gradients), computed directly: what accumulation promises."""
  outs = [jax.value_and_grad(task_loss, has_aux=True)(params, h) for h in halves]
  grads = jax.tree.map(lambda *g: sum(g) / len(g), *[g for (_, _), g in outs])
  metrics = [m for (_, m), _ in outs]
  return grads, metrics


def _grad_norm(g):
  return float(np.sqrt(sum(float(np.sum(np.asarray(x, np.float64) ** 2)) for x in jax.tree.leaves(g))))


def test_grad_accum_moe_forms_load_balance_per_micro_batch():
  """MoE LM, accum=2: the cross-entropy part is the full batch's, but the load-balance loss is formed per
  micro-batch (the mean of the halves' f_e . P_e products, not the product of the full batch's means), so the
  step follows the mean of the halves' gradients, not the full batch's."""
  from moejax.tasks import lm

  cfg = _cfg("optim.warmup_steps=0", "model.moe.num_experts=4", "model.moe.offset=0", "model.moe.every=1",
             "model.moe.load_balance_weight=1.0")
  cfg2 = config.derive(cfg, {"optim.grad_accum": 2})
  batch = _lm_batch(cfg)
  _, (m2, *_) = _steps(cfg2, batch, n=1)
  params = train.init_state(train.setup(cfg, _one_device()), jax.random.key(0))["params"]
  loss = jax.jit(lambda p, b: lm.loss_fn(p, b, cfg, rng=None, train=True))
  halves = [{"tokens": batch["tokens"][i * 4:(i + 1) * 4]} for i in range(2)]
  g_half, m_half = _half_grad_stats(loss, params, halves)
  (_, m_full), g_full = jax.value_and_grad(loss, has_aux=True)(params, batch)
  np.testing.assert_allclose(m2["aux_loss"], np.mean([m["aux_loss"] for m in m_half]), rtol=1e-5)
  np.testing.assert_allclose(m2["ce_loss"], m_full["ce_loss"], rtol=1e-5)
  np.testing.assert_allclose(m2["grad_norm"], _grad_norm(g_half), rtol=1e-5)
  assert abs(float(m_full["aux_loss"]) - float(m2["aux_loss"])) > 1e-4  # the difference is real here
  assert abs(_grad_norm(g_full) - _grad_norm(g_half)) > 1e-4 * _grad_norm(g_full)


def test_grad_accum_clip_shrinks_negatives_to_the_micro_batch():
  """CLIP, accum=2: each micro-batch's contrastive loss scores its B/2 pairs against B/2 - 1 negatives, not
  B - 1: the step is the mean of the halves' losses and gradients, not the full batch's."""
  from clip_helpers import random_clip_batch, tiny_clip_cfg

  from moejax.tasks import contrastive

  cfg = tiny_clip_cfg(**{"optim.warmup_steps": 0, "data.batch_size": 8})
  cfg2 = config.derive(cfg, {"optim.grad_accum": 2})
  batch = random_clip_batch(cfg, 8)
  _, (m2, *_) = _steps(cfg2, batch, n=1)
  params = train.init_state(train.setup(cfg, _one_device()), jax.random.key(0))["params"]
  loss = jax.jit(lambda p, b: contrastive.loss_fn(p, b, cfg, rng=None, train=True))
  halves = [{k: v[i * 4:(i + 1) * 4] for k, v in batch.items()} for i in range(2)]
  g_half, m_half = _half_grad_stats(loss, params, halves)
  (_, m_full), g_full = jax.value_and_grad(loss, has_aux=True)(params, batch)
  np.testing.assert_allclose(m2["contrastive_loss"], np.mean([m["contrastive_loss"] for m in m_half]), rtol=1e-5)
  np.testing.assert_allclose(m2["grad_norm"], _grad_norm(g_half), rtol=1e-5)
  # Fewer negatives: the halves' loss is lower (log 4 vs log 8 at chance).
  assert float(m2["contrastive_loss"]) < float(m_full["contrastive_loss"]) - 0.1
