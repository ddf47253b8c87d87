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
