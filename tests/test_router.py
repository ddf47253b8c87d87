"""Router invariants: top-k weights, Switch load-balance normalization, expert-choice capacities, z-loss."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import config
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
