"""Restore onto another mesh: a checkpoint saved on one mesh shape and device count restores, bit for bit, onto
another (the abstract state's shardings say where every shard goes) and training continues from it."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import checkpoint, config, registry, sharding, train

TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64", "data.seq_len=32",
        "data.batch_size=8", "train.eval_steps=1", "train.log_every=1", "optim.warmup_steps=2",
        "train.eval_every=100", "train.checkpoint_every=3"]


def _cfg(*extra):
  return registry.get("lm_moe_tiny", [*TINY, *extra])


def _mesh(n_devices, **axes):
  return sharding.make_mesh(config.MeshConfig(**{"data": 1, **axes}), devices=jax.devices()[:n_devices])


def _flat(tree):
  return {k: np.asarray(v) for k, v in sharding.flatten(tree).items()}


@pytest.fixture(scope="module")
def saved_on_data8(tmp_path_factory):
  """A MoE train state on mesh data=8 (8 devices), every leaf random (moments too, so that nothing restores
  right by accident), checkpointed at step 7."""
  wd = tmp_path_factory.mktemp("reshard") / "data8"
  cfg = _cfg("train.steps=6")
  s = train.setup(cfg, _mesh(8, data=8))
  state = train.init_state(s, jax.random.key(0), step=7)
  rng = np.random.default_rng(0)
  state = jax.tree.map(lambda x: jax.device_put(rng.standard_normal(x.shape).astype(x.dtype), x.sharding)
                       if jnp.issubdtype(x.dtype, jnp.floating) else x, state)
  mngr = checkpoint.Manager(wd, async_save=False)
  mngr.save(7, state, cfg)
  mngr.close()
  return wd, state


@pytest.mark.parametrize("n_devices, axes", [
  (4, dict(fsdp=2, expert=2)),
  (2, dict(tensor=2)),
  (1, dict()),
  (8, dict(fsdp=2, expert=4)),
])
def test_restore_onto_another_mesh_is_exact(saved_on_data8, n_devices, axes):
  wd, saved_state = saved_on_data8
  mesh = _mesh(n_devices, **axes)
  s = train.setup(_cfg("train.steps=6"), mesh)
  step, state = checkpoint.Manager(wd, async_save=False).restore_latest(s.abstract_state)
  assert step == 7 and int(state["step"]) == 7
  saved, restored = _flat(saved_state), _flat(state)
  assert saved.keys() == restored.keys()
  assert any(k.startswith("opt_state/") for k in saved)  # the optimizer moments came along
  for k in saved:
    np.testing.assert_array_equal(saved[k], restored[k], err_msg=k)
  # Every leaf lives where the new mesh says, not where it was saved.
  leaves, want = jax.tree.leaves(state), jax.tree.leaves(s.state_shardings)
  assert len(leaves) == len(want)
  for x, w in zip(leaves, want):
    assert x.sharding.is_equivalent_to(w, x.ndim), (x.sharding, w)
  assert {d.id for x in leaves for d in x.sharding.device_set} == {d.id for d in mesh.devices.flat}
  if axes.get("expert"):  # expert weights really are split over the new expert axis
    w = next(v for k, v in sharding.flatten(state["params"]).items() if "experts" in k)
    assert w.sharding.spec[0] == "expert", w.sharding


@pytest.mark.slow
def test_training_continues_on_the_new_mesh(tmp_path):
  """6 steps on data=8 (checkpoints at 3 and 6); the step-3 checkpoint resumed on fsdp=2 x expert=2 with 4
  devices for 3 more steps gives the same params as the uninterrupted run (up to float reassociation across
  the different shardings)."""
  cfg = _cfg("train.steps=6")
  ref = train.train(cfg, tmp_path / "ref", mesh=_mesh(8, data=8), progress=False)
  assert checkpoint.Manager(tmp_path / "ref").all_steps() == [3, 6]
  run = tmp_path / "run"
  (run / "checkpoints").mkdir(parents=True)
  shutil.copytree(tmp_path / "ref" / "checkpoints" / "3", run / "checkpoints" / "3")
  mesh = _mesh(4, fsdp=2, expert=2)
  r = train.train(cfg, run, mesh=mesh, progress=False)
  assert r["step"] == 6 and r["status"] == "completed"
  assert checkpoint.Manager(run).all_steps() == [3, 6]
  a, b = _flat(ref["state"]["params"]), _flat(r["state"]["params"])
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=1e-5, rtol=1e-5, err_msg=k)
  assert {d.id for x in jax.tree.leaves(r["state"]) for d in x.sharding.device_set} == \
    {d.id for d in mesh.devices.flat}


def test_restore_with_another_process_count_keeps_the_checkpoint(tmp_path, capsys):
  """A run resized from 2 processes to 1: grain's per-process data positions cannot carry over. The state is
  restored and the data stream starts over, with a warning; the step is not mistaken for a damaged one."""
  cfg = registry.get("lm_dense_tiny", [*TINY, "model.num_layers=1", "train.steps=6"])
  s = train.setup(cfg, _mesh(8, data=8))
  state = train.init_state(s, jax.random.key(1), step=5)
  it = s.task.make_iterator(cfg, cfg.data.train_split, process_index=0, process_count=1, seed=0, repeat=True)
  first = next(it)
  mngr = checkpoint.Manager(tmp_path, async_save=False)
  mngr.save(5, state, cfg, it)
  mngr.close()
  data = tmp_path / "checkpoints" / "5" / "data"
  (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")  # as if written by 2 processes
  (data / "process_1-of-2.json").write_text((data / "process_0-of-2.json").read_text())
  fresh = s.task.make_iterator(cfg, cfg.data.train_split, process_index=0, process_count=1, seed=0, repeat=True)
  step, restored = checkpoint.Manager(tmp_path, async_save=False).restore_latest(s.abstract_state, fresh)
  assert step == 5 and int(restored["step"]) == 5
  out = capsys.readouterr().err  # a warning: stderr, so a verb's stdout stays its output
  assert "written by 2 processes, this run has 1" in out and "starts over" in out and "damaged" not in out
  assert not (tmp_path / "checkpoints_damaged").exists()
  np.testing.assert_array_equal(next(fresh)["tokens"], first["tokens"])  # from the beginning of the stream
  a, b = _flat(state), _flat(restored)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
