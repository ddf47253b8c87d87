"""`moejax upcycle` and `init.upcycle_from` end to end: a dense run's checkpoint becomes an MoE run whose
validation cross-entropy at its first step equals the dense model's (function preservation through the
checkpoint path), and training continues the dense step and data stream."""

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from moejax import checkpoint, cli, registry, sharding, train
from moejax.models import transformer

TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64", "data.seq_len=32",
        "data.batch_size=8", "train.eval_steps=2", "train.log_every=1", "optim.warmup_steps=2",
        "train.schedule_steps=8", "train.checkpoint_every=4", "train.eval_every=4"]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
  d = tmp_path_factory.mktemp("dense")
  train.train(registry.get("lm_dense_tiny", TINY + ["train.steps=4"]), d, progress=False)
  return d


def test_moejax_upcycle_cli_preserves_function_and_continues(dense_run, tmp_path):
  to = tmp_path / "moe"
  assert cli.main(["upcycle", "--from", str(dense_run), "--exp", "lm_upcycle_tiny", "--to", str(to),
                   *TINY, "train.steps=8"]) == 0
  mngr = checkpoint.Manager(to)
  assert mngr.all_steps() == [4]  # init.continue_step: the dense step carries over
  cfg = checkpoint.read_config(to)
  assert cfg.init.upcycle_from == str(dense_run) and cfg.model.moe.num_experts == 8
  # params only (no optimizer state written), and the dense run's data position travels with them
  s = train.setup(cfg)
  assert mngr.is_params_only(4) and not checkpoint.Manager(dense_run).is_params_only(4)
  it_up = train.train_iterator(s)
  saved = mngr.restore_step(4, s.abstract_state, it_up)
  assert set(saved) == {"step", "params"} and int(saved["step"]) == 4
  on_disk = ocp.PyTreeCheckpointer().metadata(to / "checkpoints" / "4" / "state").item_metadata
  assert set(on_disk.keys()) == {"step", "params"}
  it_dense = train.train_iterator(s)
  checkpoint.restore_data_state(dense_run, it_dense)
  np.testing.assert_array_equal(next(it_up)["tokens"], next(it_dense)["tokens"])
  mngr.close()
  dense_eval = train.evaluate(dense_run)
  moe_eval = train.evaluate(to)
  np.testing.assert_allclose(moe_eval["ce_loss"], dense_eval["ce_loss"], rtol=1e-5)
  assert moe_eval["aux_loss"] > 0  # the router exists and is measured
  r = train.train(cfg, to, progress=False)
  assert r["step"] == 8 and np.isfinite(r["eval"]["loss"])
  # a second upcycle into the same place is refused rather than mixed with the run
  assert cli.main(["upcycle", "--from", str(dense_run), "--exp", "lm_upcycle_tiny", "--to", str(to)]) == 2


def test_moejax_upcycle_dry_run_shows_the_plan_and_writes_nothing(dense_run, tmp_path, capsys):
  to = tmp_path / "moe"
  argv = ["upcycle", "--from", str(dense_run), "--exp", "lm_upcycle_tiny", *TINY, "--dry-run"]
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  # layers 1 and 3 are MoE (every other MLP): experts from the dense MLP, fresh routers; the rest copied
  assert "layers/1/moe/experts/w_up" in out and "<- to_experts" in out and "layers/1/mlp/w_up" in out
  assert "layers/1/moe/router/w" in out and "<- router" in out and "layers/0/moe" not in out
  assert "params copied unchanged" in out and "the run starts at step 4 (init.continue_step)" in out
  cfg = registry.get("lm_upcycle_tiny", TINY)
  n_dense = sum(np.prod(s.shape) for s in jax.tree.leaves(transformer.specs(registry.get("lm_dense_tiny", TINY).model),
                                                            is_leaf=sharding.is_spec))
  n_moe = sum(np.prod(s.shape) for s in jax.tree.leaves(transformer.specs(cfg.model), is_leaf=sharding.is_spec))
  assert f"{n_dense / 1e6:.2f}M params" in out and f"{n_moe / 1e6:.2f}M params" in out
  assert not to.exists()
  # the same checks as a real upcycle: an incompatible target is a one-line error, exit 2
  assert cli.main([*argv, "model.d_ff=48"]) == 2  # (overrides may follow the flags)
  assert "model.d_ff: dense 64 != target 48" in capsys.readouterr().err
  assert cli.main(["upcycle", "--from", str(dense_run), "--exp", "lm_upcycle_tiny", *TINY]) == 2  # no --to
  assert "needs --to DIR" in capsys.readouterr().err


def test_init_upcycle_from_in_train_continues_data_stream(dense_run, tmp_path):
  cfg = registry.get("lm_upcycle_tiny", TINY + ["train.steps=6", f"init.upcycle_from={dense_run}"])
  r = train.train(cfg, tmp_path, progress=False)
  assert r["step"] == 6
  from moejax import metrics

  rows = [x for x in metrics.read_jsonl(tmp_path) if x["split"] == "train"]
  assert rows[0]["step"] == 5  # started at the dense step 4
  # ...and continued the dense LR schedule (a fresh optimizer state must not restart the LR clock)
  from moejax import optim

  sched = optim.schedule(cfg.optim, cfg.train.schedule_steps)
  np.testing.assert_allclose([r["lr"] for r in rows], [float(sched(r["step"] - 1)) for r in rows], rtol=1e-6)
  # the data position continued from the dense run's checkpoint: its next batch is the one dense step 5 sees
  it_dense = train.tasks.get("lm").make_iterator(cfg, "train")
  checkpoint.restore_data_state(dense_run, it_dense)
  it_fresh = train.tasks.get("lm").make_iterator(cfg, "train")
  assert not np.array_equal(next(it_dense)["tokens"], next(it_fresh)["tokens"])


def test_upcycle_from_a_missing_run_is_a_clear_error(tmp_path):
  cfg = registry.get("lm_upcycle_tiny", TINY + [f"init.upcycle_from={tmp_path / 'nope'}"])
  with pytest.raises(FileNotFoundError, match="no moejax config found"):
    train.train(cfg, tmp_path / "run", progress=False)
