"""Router invariants: top-k weights, Switch load-balance normalization, expert-choice capacities, z-loss."""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import config, routers
from moejax.layers import router


def _probs(G=2, S=16, E=4, seed=0):
  logits = jax.random.normal(jax.random.PRNGKey(seed), (G, S, E)) * 2.0
  return logits, jax.nn.softmax(logits, -1)


def test_token_choice_renormalized_weights_sum_to_one():
  _, probs = _probs()
  tc = router.token_choice(probs, 2, renormalize=True)
  np.testing.assert_allclose(np.asarray(jnp.sum(tc.weight_GSK, -1)), 1.0, rtol=1e-6)
  # The chosen experts are the two most probable ones, best first.
  order = np.argsort(-np.asarray(probs), -1)[..., :2]
  np.testing.assert_array_equal(np.asarray(tc.expert_GSK), order)


def test_token_choice_without_renormalize_keeps_probabilities():
  _, probs = _probs()
  tc = router.token_choice(probs, 2, renormalize=False)
  expect = np.take_along_axis(np.asarray(probs), np.asarray(tc.expert_GSK), -1)
  np.testing.assert_allclose(np.asarray(tc.weight_GSK), expect, rtol=1e-6)
  assert np.all(np.asarray(jnp.sum(tc.weight_GSK, -1)) < 1.0)


def test_selection_bias_changes_choice_not_weights():
  _, probs = _probs(E=4)
  bias = jnp.array([10.0, 0.0, 0.0, 0.0])  # expert 0 always selected first
  tc = router.token_choice(probs, 1, renormalize=False, bias_E=bias)
  assert np.all(np.asarray(tc.expert_GSK) == 0)
  np.testing.assert_allclose(np.asarray(tc.weight_GSK[..., 0]), np.asarray(probs[..., 0]), rtol=1e-6)


def test_load_balance_loss_is_one_at_uniform_routing():
  # Uniform probabilities and a perfectly even assignment: f_e = P_e = 1/E, E * sum f P = 1.
  G, S, E, k = 1, 8, 4, 2
  logits = jnp.zeros((G, S, E))
  probs = jax.nn.softmax(logits, -1)
  experts = jnp.array([[[s % E, (s + 1) % E] for s in range(S)]], jnp.int32)
  tc = router.TokenChoice(experts, jnp.full((G, S, k), 0.5))
  aux = router.aux_from_stats(router.stats(logits, probs, tc), jnp.zeros(()), config.MoEConfig(num_experts=E))
  np.testing.assert_allclose(float(aux["load_balance_loss"]), 1.0, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(aux["expert_load"]), 0.25, rtol=1e-6)
  np.testing.assert_allclose(float(aux["router_entropy"]), np.log(E), rtol=1e-6)
  np.testing.assert_allclose(float(aux["z_loss"]), np.log(E) ** 2, rtol=1e-6)


def test_load_balance_loss_grows_with_imbalance():
  G, S, E = 1, 8, 4
  logits = jnp.zeros((G, S, E)).at[..., 0].set(3.0)
  probs = jax.nn.softmax(logits, -1)
  tc = router.token_choice(probs, 1, renormalize=False)
  aux = router.aux_from_stats(router.stats(logits, probs, tc), jnp.zeros(()), config.MoEConfig(num_experts=E))
  # Everything on expert 0: f = (1, 0, 0, 0), lb = E * P_0.
  np.testing.assert_allclose(float(aux["load_balance_loss"]), E * float(jnp.mean(probs[..., 0])), rtol=1e-6)
  assert float(aux["load_balance_loss"]) > 3.0


def test_aux_loss_is_weighted_sum():
  logits, probs = _probs()
  tc = router.token_choice(probs, 2, renormalize=True)
  moe = config.MoEConfig(num_experts=4, load_balance_weight=0.3, z_loss_weight=0.07)
  aux = router.aux_from_stats(router.stats(logits, probs, tc), jnp.zeros(()), moe)
  np.testing.assert_allclose(float(aux["aux_loss"]),
                             0.3 * float(aux["load_balance_loss"]) + 0.07 * float(aux["z_loss"]), rtol=1e-6)
  z = np.mean(np.log(np.sum(np.exp(np.asarray(logits, np.float64)), -1)) ** 2)
  np.testing.assert_allclose(float(aux["z_loss"]), z, rtol=1e-5)
  for key in ("aux_loss", "load_balance_loss", "z_loss", "dropped_fraction", "router_entropy"):
    assert aux[key].shape == () and aux[key].dtype == jnp.float32
  np.testing.assert_allclose(float(jnp.sum(aux["expert_load"])), 1.0, rtol=1e-6)


@pytest.mark.parametrize("cf,S,E", [(1.0, 16, 4), (2.0, 16, 4), (1.0, 12, 3), (0.5, 32, 8)])
def test_expert_choice_gives_each_expert_exactly_c_t_over_e_tokens(cf, S, E):
  _, probs = _probs(G=3, S=S, E=E, seed=1)
  C = router.expert_capacity(cf, S, E)
  assert C == int(cf * S / E)  # these sizes divide evenly
  ec = router.expert_choice(probs, C)
  assert ec.token_GEC.shape == (3, E, C)
  toks = np.asarray(ec.token_GEC)
  for g in range(3):
    for e in range(E):
      assert len(set(toks[g, e])) == C  # C distinct tokens per expert per sequence
      best = np.argsort(-np.asarray(probs[g, :, e]))[:C]
      assert set(best) == set(toks[g, e])


def test_expert_capacity():
  assert router.expert_capacity(1.25, 128, 8, 2) == 40
  assert router.expert_capacity(100.0, 16, 4, 2) == 16  # capped by the group size
  assert router.expert_capacity(0.01, 16, 4) == 1
  with pytest.raises(ValueError, match="capacity_factor"):
    router.expert_capacity(0.0, 16, 4)


def test_top_k_larger_than_experts_errors():
  _, probs = _probs(E=4)
  with pytest.raises(ValueError, match="top_k=5"):
    router.token_choice(probs, 5, renormalize=True)


def test_jitter_only_with_rng():
  x = jax.random.normal(jax.random.PRNGKey(0), (1, 4, 8))
  w = jax.random.normal(jax.random.PRNGKey(1), (8, 3))
  base = router.logits(w, x)
  np.testing.assert_array_equal(np.asarray(router.logits(w, x, jitter=0.1)), np.asarray(base))
  noisy = router.logits(w, x, jitter=0.1, rng=jax.random.PRNGKey(2))
  assert not np.allclose(np.asarray(noisy), np.asarray(base))
  assert noisy.dtype == jnp.float32


@pytest.mark.parametrize("router_name,kw", [("token_choice", dict(top_k=2, dispatch="capacity")),
                                            ("token_choice", dict(top_k=1, dispatch="dropless")),
                                            ("expert_choice", dict())])
def test_zero_initialised_router_spreads_tokens_at_step0(router_name, kw):
  """Exact ties do not all go to experts 0..k-1 (lax.top_k's lowest-index rule): a zero router spreads the
  tokens evenly and, at capacity factor 1, drops nothing."""
  from moejax import sharding
  from moejax.layers import moe

  cfg = config.ModelConfig(d_model=16, d_ff=24, moe=config.MoEConfig(num_experts=4, router=router_name,
                                                                     capacity_factor=1.0, renormalize=False, **kw))
  p = sharding.init_params(jax.random.key(0), moe.specs(cfg))
  p["router"]["w"] = jnp.zeros_like(p["router"]["w"])
  _, aux = moe.apply(p, jax.random.normal(jax.random.key(1), (2, 16, 16)), cfg)
  np.testing.assert_allclose(np.asarray(aux["expert_load"]), 0.25, rtol=1e-6)
  assert float(aux["dropped_fraction"]) == 0.0
  tc = router.token_choice(jnp.full((1, 8, 4), 0.25), 2, renormalize=True)
  np.testing.assert_array_equal(np.bincount(np.asarray(tc.expert_GSK).reshape(-1), minlength=4), [4, 4, 4, 4])
  ec = router.expert_choice(jnp.full((1, 8, 4), 0.25), 2)
  assert sorted(np.asarray(ec.token_GEC).reshape(-1).tolist()) == list(range(8))


def test_top1_renormalize_warns_and_starves_the_router():
  """top_k=1 + renormalize: the combine weight is 1 and the task loss gives the router no gradient (hence the
  warning); without renormalize (Switch) the router learns from the task loss."""
  from moejax import sharding
  from moejax.layers import moe

  x = jax.random.normal(jax.random.key(1), (1, 8, 16))

  def router_grad(renormalize):
    cfg = config.ModelConfig(d_model=16, d_ff=24, moe=config.MoEConfig(
      num_experts=4, top_k=1, renormalize=renormalize, load_balance_weight=0.0, z_loss_weight=0.0))
    p = sharding.init_params(jax.random.key(0), moe.specs(cfg))
    return jax.grad(lambda p: jnp.sum(moe.apply(p, x, cfg)[0] ** 2))(p)["router"]["w"]

  with pytest.warns(UserWarning, match="top_k=1 with moe.renormalize=True"):
    g = router_grad(True)
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    g_switch = router_grad(False)
  # d(p / p) = 0 up to rounding: float32 leaves ~1e-7 of p/p's derivative, against O(1) for Switch's weight p.
  assert float(jnp.abs(g).max()) < 1e-4 * float(jnp.abs(g_switch).max())


def test_expert_choice_active_params_and_flops_use_its_capacity():
  """Expert choice applies E * C / S experts per token on average (C = ceil(cf * S / E)), not top_k: at cf=2 a
  model costs what top-2 token choice costs."""
  from moejax.models import transformer, two_tower

  def lm(**kw):
    return config.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=64,
                              moe=config.MoEConfig(num_experts=8, every=1, offset=0, **kw))

  ec, tc2 = lm(router="expert_choice", top_k=1, capacity_factor=2.0), lm(top_k=2)
  assert routers.experts_per_token(ec.moe, 64) == 2.0
  assert routers.experts_per_token(config.MoEConfig(num_experts=8, router="expert_choice", capacity_factor=1.0), 12) \
    == 8 * 2 / 12  # C = ceil(12 / 8) = 2
  assert transformer.num_params(ec, active=True) == transformer.num_params(tc2, active=True)
  assert transformer.flops_per_token(ec, 64) == transformer.flops_per_token(tc2, 64)
  assert transformer.flops_per_token(ec, 64) > transformer.flops_per_token(lm(top_k=1), 64)
  over = {"clip.vision.moe.num_experts": 4, "clip.vision.moe.offset": 0, "clip.vision.moe.every": 1}
  base = config.derive(config.ExperimentConfig(task="clip"), over)  # 64 + 1 vision tokens
  ec_clip = config.derive(base, {"clip.vision.moe.router": "expert_choice", "clip.vision.moe.capacity_factor": 2.0,
                                 "clip.vision.moe.top_k": 1})
  n_img = 65
  k_eff = 4 * router.expert_capacity(2.0, n_img, 4) / n_img
  assert k_eff > 1.9
  assert two_tower.flops_per_example(ec_clip) > two_tower.flops_per_example(
    config.derive(base, {"clip.vision.moe.top_k": 1}))
  assert two_tower.num_params(ec_clip, active=True) > two_tower.num_params(
    config.derive(base, {"clip.vision.moe.top_k": 1}), active=True)


def test_capacity_dispatch_slot_flops_count_the_whole_buffer():
  """`slots=True`: capacity dispatch pays for its [E, C] buffer per group, C = ceil(cf * k * S / E), empty slots
  included; dropless token choice and expert choice cost the same either way. Checked against the hand count
  6 x tokens x (E * C / S - k) x 2 D F per MoE layer (w_up and w_down of one expert)."""
  from moejax.models import transformer, two_tower

  over = {"clip.vision.moe.num_experts": 4, "clip.vision.moe.offset": 0, "clip.vision.moe.every": 1,
          "clip.vision.moe.top_k": 2}
  dropless = config.derive(config.ExperimentConfig(task="clip"), over)
  v = dropless.clip.vision
  n_img = 65  # 64 patches + the class token
  assert two_tower.flops_per_example(dropless, slots=True) == two_tower.flops_per_example(dropless)
  for cf, C in ((1.0, 33), (1.5, 49), (2.0, 65)):  # ceil(cf * 2 * 65 / 4), at most S
    cap = config.derive(dropless, {"clip.vision.moe.dispatch": "capacity", "clip.vision.moe.capacity_factor": cf})
    assert router.expert_capacity(cf, n_img, 4, 2) == C
    assert two_tower.flops_per_example(cap) == two_tower.flops_per_example(dropless)  # routed (model) FLOPs
    extra = 6.0 * n_img * (4 * C / n_img - 2) * 2 * v.d_model * v.d_ff * v.num_layers
    assert two_tower.flops_per_example(cap, slots=True) - two_tower.flops_per_example(dropless) == \
      pytest.approx(extra, rel=1e-12)
  lm = config.ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=64,
                          moe=config.MoEConfig(num_experts=8, every=1, offset=0, top_k=2, dispatch="capacity",
                                               capacity_factor=1.25))
  C = router.expert_capacity(1.25, 12, 8, 2)  # ceil(3.75) = 4 slots of 12 tokens' 24 picks -> 32 slots
  assert routers.experts_per_token(lm.moe, 12, slots=True) == 8 * C / 12 == 32 / 12
  assert lm.activation == "swiglu"  # three expert matrices (gate, up, down); num_params counts whole params
  assert transformer.flops_per_token(lm, 12, slots=True) - transformer.flops_per_token(lm, 12) == pytest.approx(
    6.0 * (32 / 12 - 2) * 3 * 32 * 64 * 2, rel=1e-3)
  ec = dataclasses.replace(lm, moe=dataclasses.replace(lm.moe, router="expert_choice", top_k=1))
  assert transformer.flops_per_token(ec, 12, slots=True) == transformer.flops_per_token(ec, 12)
