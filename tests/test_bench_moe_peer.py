"""`moejax bench moe`'s peer column: transformers' Mixtral block gets moejax's weights and must compute the same
outputs and gradients before it is timed (torch.compile is left to the benchmark: its compile takes minutes)."""

import jax

from moejax import config, sharding
from moejax.bench import moe_peer
from moejax.layers import moe


def _setup(**moe_kw):
  cfg = config.ModelConfig(d_model=16, d_ff=8, num_heads=1, moe=config.MoEConfig(
    num_experts=4, top_k=2, dispatch="dropless", gmm_backend="sorted", **moe_kw))
  p = sharding.init_params(jax.random.PRNGKey(0), moe.specs(cfg))
  x = jax.random.normal(jax.random.PRNGKey(1), (2, 32, 16))
  g = jax.random.normal(jax.random.PRNGKey(2), x.shape)
  return cfg, p, x, g


def test_mixtral_peer_matches_moejax_and_runs():
  assert moe_peer.available()  # the interop extra is part of the test environment
  cfg, p, x, g = _setup()
  fwd, bwd, skipped = moe_peer.peer_fns(["hf-eager", "hf-grouped"], p, cfg, x, g)
  assert skipped == {} and set(fwd) == set(bwd) == {"hf-eager", "hf-grouped"}
  assert tuple(fwd["hf-eager"]().shape) == x.shape
  assert tuple(bwd["hf-grouped"]().shape) == x.shape  # d input


def test_mixtral_peer_that_computes_something_else_is_left_out():
  # Mixtral renormalizes its top-k weights; a moejax layer that does not computes other outputs, and the
  # check must catch it rather than time the mismatch.
  cfg, p, x, g = _setup(renormalize=False)
  fwd, _, skipped = moe_peer.peer_fns(["hf-eager"], p, cfg, x, g)
  assert fwd == {} and "differs from moejax" in skipped["hf-eager"]
