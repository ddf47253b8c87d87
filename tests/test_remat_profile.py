"""Remat policies (`model.remat_policy`) give the same loss and gradients as no remat; `train.profile_steps`
writes a jax.profiler trace of the asked steps into the workdir."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from run_helpers import TINY_LM

from moejax import config, registry, sharding, train
from moejax.models import transformer

POLICIES = ("full", "dots", "dots_no_batch", "save_moe")


def _cfg(**kw):
  # One MoE block (dense grouped matmul: the cheapest to compile; save_moe needs an MoE layer).
  return config.ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, d_ff=64,
                            max_seq_len=32, moe=config.MoEConfig(num_experts=4, every=1, offset=0, gmm_backend="dense"),
                            **kw)


def _remat_eqns(jaxpr):
  for e in jaxpr.eqns:
    if e.primitive.name in ("checkpoint", "remat", "remat2"):
      yield e
    for v in e.params.values():
      inner = getattr(v, "jaxpr", v)
      if hasattr(inner, "eqns"):
        yield from _remat_eqns(inner)


def test_every_remat_policy_gives_the_same_loss_and_grads():
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 64)
  params = sharding.init_params(jax.random.key(0), transformer.specs(_cfg()))

  def loss(p, cfg):
    logits, aux = transformer.forward(p, tokens, cfg)
    return jnp.mean(jax.nn.logsumexp(logits, -1)) + aux["aux_loss"]

  cfgs = [_cfg()] + [_cfg(remat=True, remat_policy=name) for name in POLICIES]
  for name, cfg in zip(POLICIES, cfgs[1:]):
    eqns = list(_remat_eqns(jax.make_jaxpr(lambda p, cfg=cfg: loss(p, cfg))(params).jaxpr))
    assert len(eqns) == cfg.num_layers, name  # one checkpoint per block, with the named policy
    if name != "save_moe":  # save_only_these_names builds a new function per call
      assert all(e.params["policy"] is transformer.remat_policy(name) for e in eqns), name
  # One program for all five (one compile): no remat, then each policy.
  outs = jax.jit(lambda p: [jax.value_and_grad(loss)(p, cfg) for cfg in cfgs])(params)
  (l0, g0), rest = outs[0], outs[1:]
  for name, (l1, g1) in zip(POLICIES, rest):
    np.testing.assert_allclose(l1, l0, rtol=1e-6, err_msg=name)
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
      np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5, err_msg=name)


def test_remat_policies_are_distinct():
  """Each name maps to its own jax.checkpoint policy (a typo'd table would silently alias two)."""
  ps = [transformer.remat_policy(n) for n in POLICIES]
  assert len({id(p) for p in ps}) == len(ps)
  with pytest.raises(config.ConfigError, match="remat_policy"):
    transformer.remat_policy("everything")


def test_profile_steps_writes_a_trace_of_those_steps(tmp_path):
  cfg = registry.get("lm_dense_tiny", [*TINY_LM, "train.steps=3", "train.profile_steps=[2,3]",
                                       "train.checkpoint_every=100"])
  train.train(cfg, tmp_path / "run", progress=False)
  traces = list((tmp_path / "run" / "profile").rglob("*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0
  events = list((tmp_path / "run" / "profile").rglob("*.trace.json.gz"))
  assert events and events[0].stat().st_size > 0


def test_no_profile_steps_writes_no_trace(tiny_lm_run):
  assert not (tiny_lm_run / "profile").exists()


def test_issue19_compute_knobs_may_change_on_resume_and_eval():
  """Profiling, remat policy, attention kernel and the expert-parallel exchange change how a run computes, not
  what its checkpoint holds: resume and eval accept them; a changed dtype policy still blocks a resume."""
  from moejax import resume

  base = registry.get("lm_moe_tiny")
  new = config.derive(base, {"train.profile_steps": [3, 4], "model.remat_policy": "dots",
                             "model.attention_impl": "einsum", "model.moe.ep_exchange": "ragged"})
  diff = resume.differences(base, new)
  assert len(diff) == 4
  assert resume.blocking(diff, "resume") == [] and resume.blocking(diff, "params") == []
  bf16 = resume.differences(base, config.derive(base, {"model.compute_dtype": "bfloat16"}))
  assert resume.blocking(bf16, "resume") == ["model.compute_dtype"]
