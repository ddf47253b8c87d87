"""Sparse upcycling: function preservation (logits and gradients), the diversity tricks, errors, sharding."""

import dataclasses
import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import config, registry, sharding, upcycle
from moejax.layers import mlp, moe
from moejax.models import transformer

BASE = dict(vocab_size=64, d_model=32, num_layers=4, num_heads=4, d_ff=64, max_seq_len=16)
ARCHS = {
  "swiglu": {},
  "gelu_bias": dict(activation="gelu", bias=True, norm="layer"),  # the CLIP towers' MLP flavour
}


def cfgs(arch: str = "swiglu", **moe_kw) -> tuple[config.ModelConfig, config.ModelConfig]:
  kw = {**BASE, **ARCHS[arch]}
  return config.ModelConfig(**kw), config.ModelConfig(**kw, moe=config.MoEConfig(**moe_kw))


def dense_params(cfg: config.ModelConfig, seed: int = 0) -> dict:
  """A dense model whose every param (biases and norm scales too) is non-trivial, as after training."""
  p = sharding.init_params(jax.random.key(seed), transformer.specs(cfg))
  leaves, tree = jax.tree.flatten(p)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@functools.partial(jax.jit, static_argnames="cfg")
def logits(params, tokens, cfg):
  return transformer.forward(params, tokens, cfg)[0]


def tokens(seed: int = 2, B: int = 2, T: int = 16) -> jax.Array:
  return jax.random.randint(jax.random.key(seed), (B, T), 0, BASE["vocab_size"])


INIT = config.UpcycleConfig()  # router N(0, 0.02), no noise, no drop
PATTERNS = {"every2": dict(every=2, offset=1), "all": dict(every=1, offset=0),
            "explicit": dict(layers=(0, 3))}


# ----------------------------------------------------------------------------------------------------------
# Function preservation
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("pattern", list(PATTERNS))
def test_upcycled_logits_equal_dense(top_k, pattern):
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=top_k, renormalize=True, dispatch="dropless",
                            **PATTERNS[pattern])
  dp = dense_params(dense_cfg)
  mp = upcycle.upcycle(dp, dense_cfg, moe_cfg, INIT, jax.random.key(1))
  moe_layers = [i for i in range(4) if moe_cfg.moe.is_moe_layer(i)]
  assert sorted(int(i) for i, lp in mp["layers"].items() if "moe" in lp) == moe_layers
  # The router is random, so tokens really are spread over different experts.
  assert float(jnp.std(mp["layers"][str(moe_layers[0])]["moe"]["router"]["w"])) > 0.01
  tok = tokens()
  np.testing.assert_allclose(logits(mp, tok, moe_cfg), logits(dp, tok, dense_cfg), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("top_k", [1, 2])
def test_upcycled_logits_equal_dense_with_biases_and_layernorm(top_k):
  dense_cfg, moe_cfg = cfgs("gelu_bias", num_experts=4, top_k=top_k)
  dp = dense_params(dense_cfg)
  mp = upcycle.upcycle(dp, dense_cfg, moe_cfg, INIT, jax.random.key(1))
  assert mp["layers"]["1"]["moe"]["experts"]["b_up"].shape == (4, 64)
  tok = tokens()
  np.testing.assert_allclose(logits(mp, tok, moe_cfg), logits(dp, tok, dense_cfg), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("shared_gate", [False, True])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_upcycled_logits_equal_dense_with_shared_expert(shared_gate, arch):
  """The shared expert is a copy of the dense MLP too; routed and shared parts each carry half the output."""
  dense_cfg, moe_cfg = cfgs(arch, num_experts=4, top_k=2, num_shared_experts=1, shared_gate=shared_gate)
  dp = dense_params(dense_cfg)
  mp = upcycle.upcycle(dp, dense_cfg, moe_cfg, INIT, jax.random.key(1))
  layer, dense_mlp = mp["layers"]["1"]["moe"], dp["layers"]["1"]["mlp"]
  np.testing.assert_array_equal(layer["shared"]["w_up"], dense_mlp["w_up"])
  shared_scale = 1.0 if shared_gate else 0.5  # sigmoid(0) = 0.5 halves a gated shared output already
  np.testing.assert_allclose(layer["shared"]["w_down"], shared_scale * dense_mlp["w_down"], rtol=1e-6)
  np.testing.assert_allclose(layer["experts"]["w_down"][2], 0.5 * dense_mlp["w_down"], rtol=1e-6)
  assert ("shared_gate" in layer) == shared_gate
  if shared_gate:
    np.testing.assert_array_equal(layer["shared_gate"]["w"], 0.0)
  tok = tokens()
  np.testing.assert_allclose(logits(mp, tok, moe_cfg), logits(dp, tok, dense_cfg), atol=1e-5, rtol=1e-5)


def test_router_bias_starts_at_zero_and_keeps_function():
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=2, bias_balance_rate=1e-3)
  dp = dense_params(dense_cfg)
  mp = upcycle.upcycle(dp, dense_cfg, moe_cfg, INIT, jax.random.key(1))
  np.testing.assert_array_equal(mp["layers"]["1"]["moe"]["router"]["bias"], np.zeros(4))
  tok = tokens()
  np.testing.assert_allclose(logits(mp, tok, moe_cfg), logits(dp, tok, dense_cfg), atol=1e-5, rtol=1e-5)


# With drops (capacity) or expert choice, each token's MoE output is the dense MLP's output times the total
# combine weight of the (token, expert) assignments that were kept. The references below recompute which ones
# are kept from the router probabilities with plain loops, following the documented rules in layers/moe.py and
# layers/router.py: groups are sequences; capacity C = ceil(cf * k * S / E) per expert and sequence, top-1
# choices placed before top-2 ones, in token order; an expert-choice expert takes its ceil(cf * S / E)
# most probable tokens of the sequence, with its probability as the weight.


def _capacity(cf, k, S, E):
  return max(1, min(S, int(np.ceil(cf * k * S / E))))


def kept_weight_token_choice(probs_BTE, k, cf, renormalize):
  B, T, E = probs_BTE.shape
  C = _capacity(cf, k, T, E)
  out = np.zeros((B, T))
  for b in range(B):
    top = np.argsort(-probs_BTE[b], axis=-1, kind="stable")[:, :k]  # [T, k]
    w = np.take_along_axis(probs_BTE[b], top, -1)
    if renormalize:
      w = w / w.sum(-1, keepdims=True)
    count = np.zeros(E, int)
    for slot in range(k):
      for t in range(T):
        e = top[t, slot]
        if count[e] < C:
          count[e] += 1
          out[b, t] += w[t, slot]
  return out


def kept_weight_expert_choice(probs_BTE, cf):
  B, T, E = probs_BTE.shape
  C = _capacity(cf, 1, T, E)
  out = np.zeros((B, T))
  for b in range(B):
    for e in range(E):
      picked = np.argsort(-probs_BTE[b, :, e], kind="stable")[:C]
      out[b, picked] += probs_BTE[b, picked, e]
  return out


def _layer_case(arch, **moe_kw):
  """An upcycled MoE layer with a sharp router (std 0.5: skewed loads, so capacity really drops), its dense
  MLP, inputs, and the router probabilities the layer will see."""
  dense_cfg, moe_cfg = cfgs(arch, num_experts=4, **moe_kw)
  dp = dense_params(dense_cfg)
  mp = upcycle.upcycle(dp, dense_cfg, moe_cfg, config.UpcycleConfig(router_std=0.5), jax.random.key(1))
  x = jax.random.normal(jax.random.key(9), (3, 16, 32))
  p_moe = mp["layers"]["1"]["moe"]
  probs = np.asarray(jax.nn.softmax(jnp.einsum("BTD,DE->BTE", x, p_moe["router"]["w"]), -1), np.float64)
  y_dense = np.asarray(mlp.apply(dp["layers"]["1"]["mlp"], x, dense_cfg.activation))
  return moe_cfg, p_moe, x, probs, y_dense


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("top_k, cf", [(1, 0.5), (2, 0.5), (2, 1.0)])
def test_capacity_dispatch_output_is_dense_times_kept_weight(arch, top_k, cf):
  moe_cfg, p_moe, x, probs, y_dense = _layer_case(arch, top_k=top_k, dispatch="capacity", capacity_factor=cf)
  y, aux = moe.apply(p_moe, x, moe_cfg)
  kept = kept_weight_token_choice(probs, top_k, cf, renormalize=True)
  assert 0 < np.mean(kept < 1 - 1e-6) < 1  # some tokens lost an assignment, some kept all
  np.testing.assert_allclose(y, y_dense * kept[..., None], atol=1e-5, rtol=1e-5)
  # The layer's drop count agrees with the reference's.
  C = _capacity(cf, top_k, 16, 4)
  n_kept = sum(min(C, int(n)) for b in range(3) for n in np.bincount(
    np.argsort(-probs[b], -1, kind="stable")[:, :top_k].ravel(), minlength=4))
  np.testing.assert_allclose(aux["dropped_fraction"], 1 - n_kept / (3 * 16 * top_k), atol=1e-6)


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("cf", [1.0, 2.0])
def test_expert_choice_output_is_dense_times_picked_probability(arch, cf):
  moe_cfg, p_moe, x, probs, y_dense = _layer_case(arch, router="expert_choice", capacity_factor=cf)
  y, _ = moe.apply(p_moe, x, moe_cfg)
  kept = kept_weight_expert_choice(probs, cf)
  assert np.any(kept == 0) or cf > 1  # some tokens no expert picked
  assert np.any(kept > 0)
  np.testing.assert_allclose(y, y_dense * kept[..., None], atol=1e-5, rtol=1e-5)


def test_capacity_dispatch_with_ample_capacity_preserves_lm_logits():
  """Capacity dispatch with room for every assignment (C = S) drops nothing: the upcycled LM is the dense
  one."""
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=2, dispatch="capacity", capacity_factor=2.0)
  dp = dense_params(dense_cfg)
  mp = upcycle.upcycle(dp, dense_cfg, moe_cfg, config.UpcycleConfig(router_std=0.5), jax.random.key(1))
  tok = tokens()
  np.testing.assert_allclose(logits(mp, tok, moe_cfg), logits(dp, tok, dense_cfg), atol=1e-5, rtol=1e-5)
  small = dataclasses.replace(moe_cfg, moe=dataclasses.replace(moe_cfg.moe, capacity_factor=0.25))
  assert float(jnp.max(jnp.abs(logits(mp, tok, small) - logits(dp, tok, dense_cfg)))) > 1e-3


def test_upcycled_gradients_match_dense():
  """First order too: summed over experts, the experts' gradients are the dense MLP's gradient (the gates of a
  token sum to one), every other param's gradient is the dense one, and the router gets none from the loss."""
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=2)
  dp = dense_params(dense_cfg)
  mp = upcycle.upcycle(dp, dense_cfg, moe_cfg, INIT, jax.random.key(1))
  tok = tokens()

  def loss(p, cfg):
    lg = transformer.forward(p, tok[:, :-1], cfg)[0]
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(lg), tok[:, 1:, None], -1))

  grad = jax.jit(jax.grad(loss), static_argnums=1)
  gd = sharding.flatten(grad(dp, dense_cfg))
  gm = sharding.flatten(grad(mp, moe_cfg))
  for path, g in gm.items():
    m = re.fullmatch(r"layers/(\d+)/moe/experts/(\w+)", path)
    if m:
      np.testing.assert_allclose(jnp.sum(g, 0), gd[f"layers/{m[1]}/mlp/{m[2]}"], atol=1e-5, err_msg=path)
    elif path.endswith("router/w"):
      np.testing.assert_allclose(g, 0.0, atol=1e-6, err_msg=path)
    else:
      np.testing.assert_allclose(g, gd[path], atol=1e-5, err_msg=path)


def test_noise_breaks_function_preservation():
  """The preservation tests can fail: with expert noise, the logits move."""
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=2)
  dp = dense_params(dense_cfg)
  mp = upcycle.upcycle(dp, dense_cfg, moe_cfg, config.UpcycleConfig(expert_noise_std=0.1), jax.random.key(1))
  tok = tokens()
  assert float(jnp.max(jnp.abs(logits(mp, tok, moe_cfg) - logits(dp, tok, dense_cfg)))) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# What each param becomes
# ----------------------------------------------------------------------------------------------------------


def test_copies_and_broadcasts_exactly():
  dense_cfg, moe_cfg = cfgs("gelu_bias", num_experts=4, top_k=2)
  dp = dense_params(dense_cfg)
  mp = sharding.flatten(upcycle.upcycle(dp, dense_cfg, moe_cfg, INIT, jax.random.key(1)))
  fd = sharding.flatten(dp)
  target = sharding.flatten(transformer.specs(moe_cfg), is_leaf=sharding.is_spec)
  assert list(mp) == list(target)
  for path, v in mp.items():
    assert v.shape == target[path].shape and v.dtype == target[path].dtype, path
    m = re.fullmatch(r"layers/(\d+)/moe/experts/(\w+)", path)
    if m:
      want = jnp.broadcast_to(fd[f"layers/{m[1]}/mlp/{m[2]}"], v.shape)
      np.testing.assert_array_equal(v, want, err_msg=path)
    elif "/router/" not in path:
      np.testing.assert_array_equal(v, fd[path], err_msg=path)


def test_router_init():
  dense_cfg, moe_cfg = cfgs(num_experts=8, top_k=2, every=1, offset=0)
  dp = dense_params(dense_cfg)
  zeros = upcycle.upcycle(dp, dense_cfg, moe_cfg, config.UpcycleConfig(router_init="zeros"),
                          jax.random.key(1))
  assert all(float(jnp.max(jnp.abs(lp["moe"]["router"]["w"]))) == 0.0 for lp in zeros["layers"].values())
  normal = upcycle.upcycle(dp, dense_cfg, moe_cfg, config.UpcycleConfig(router_std=0.05), jax.random.key(1))
  w = jnp.stack([lp["moe"]["router"]["w"] for lp in normal["layers"].values()])  # 4 x 32 x 8 = 1024 draws
  assert abs(float(jnp.std(w)) / 0.05 - 1) < 0.1 and abs(float(jnp.mean(w))) < 0.01
  assert not np.allclose(w[0], w[1])  # each layer draws its own router


def test_seed_default_and_key_determinism():
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=2)
  dp = dense_params(dense_cfg)
  a = upcycle.upcycle(dp, dense_cfg, moe_cfg, config.UpcycleConfig(seed=3))
  b = upcycle.upcycle(dp, dense_cfg, moe_cfg, config.UpcycleConfig(seed=3), jax.random.key(3))
  c = upcycle.upcycle(dp, dense_cfg, moe_cfg, config.UpcycleConfig(seed=4))
  ra, rb, rc = (x["layers"]["1"]["moe"]["router"]["w"] for x in (a, b, c))
  np.testing.assert_array_equal(ra, rb)
  assert not np.allclose(ra, rc)


def test_expert_noise_differs_per_expert_relative_to_weight_std():
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=2)
  dp = dense_params(dense_cfg)
  mp = upcycle.upcycle(dp, dense_cfg, moe_cfg, config.UpcycleConfig(expert_noise_std=0.1), jax.random.key(1))
  for name in ("w_gate", "w_up", "w_down"):
    w_dense = dp["layers"]["1"]["mlp"][name]
    w = mp["layers"]["1"]["moe"]["experts"][name]
    delta = w - w_dense[None]
    # 2048 draws per expert: the empirical std is within a few percent of 0.1 * std(w_dense).
    for e in range(4):
      assert abs(float(jnp.std(delta[e])) / (0.1 * float(jnp.std(w_dense))) - 1) < 0.1, (name, e)
    assert float(jnp.max(jnp.abs(delta[0] - delta[1]))) > 0  # experts get different noise
    assert abs(float(jnp.corrcoef(delta[0].ravel(), delta[1].ravel())[0, 1])) < 0.1


def _changed_units(w_E, dense, axis):
  """[E, F] bool: hidden unit f of expert e differs anywhere from the dense weight."""
  diff = w_E != dense[None]
  other = tuple(a for a in range(1, diff.ndim) if a != axis)
  return np.asarray(jnp.any(diff, axis=other)) if other else np.asarray(diff)


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0])
def test_drop_upcycling_reinitializes_exact_units_per_expert(ratio):
  dense_cfg, moe_cfg = cfgs("gelu_bias", num_experts=4, top_k=2)  # gelu_bias: w_up, b_up, w_down, b_down
  dp = dense_params(dense_cfg)
  mp = upcycle.upcycle(dp, dense_cfg, moe_cfg, config.UpcycleConfig(drop_ratio=ratio), jax.random.key(1))
  F, E = 64, 4
  n = round(ratio * F)
  masks = []
  for layer in ("1", "3"):
    d, ex = dp["layers"][layer]["mlp"], mp["layers"][layer]["moe"]["experts"]
    up = _changed_units(ex["w_up"], d["w_up"], 2)
    masks.append(up)
    np.testing.assert_array_equal(up.sum(1), [n] * E)
    # One set of units per expert: the same columns of w_up, rows of w_down, entries of b_up.
    np.testing.assert_array_equal(up, _changed_units(ex["w_down"], d["w_down"], 1))
    np.testing.assert_array_equal(up, _changed_units(ex["b_up"], d["b_up"], 1))
    np.testing.assert_array_equal(ex["b_down"], jnp.broadcast_to(d["b_down"], (E, 32)))  # has no hidden axis
    # Re-drawn units follow the dense weight's statistics.
    fresh = np.asarray(ex["w_up"]).transpose(0, 2, 1)[up]  # [E * n, D]
    w = np.asarray(d["w_up"])
    assert abs(fresh.mean() - w.mean()) < 0.1 * w.std() and abs(fresh.std() / w.std() - 1) < 0.1
  if n < F:  # different units per expert, and per layer
    assert len({tuple(row) for row in masks[0]}) == E
    assert not np.array_equal(masks[0], masks[1])


def test_drop_upcycling_swiglu_drops_gate_up_down_together():
  dense_cfg, moe_cfg = cfgs(num_experts=8, top_k=2)
  dp = dense_params(dense_cfg)
  mp = upcycle.upcycle(dp, dense_cfg, moe_cfg, config.UpcycleConfig(drop_ratio=0.3), jax.random.key(1))
  d, ex = dp["layers"]["1"]["mlp"], mp["layers"]["1"]["moe"]["experts"]
  gate = _changed_units(ex["w_gate"], d["w_gate"], 2)
  np.testing.assert_array_equal(gate.sum(1), [upcycle.num_dropped(64, 0.3)] * 8)
  assert upcycle.num_dropped(64, 0.3) == 19  # 19.2 -> 19
  np.testing.assert_array_equal(gate, _changed_units(ex["w_up"], d["w_up"], 2))
  np.testing.assert_array_equal(gate, _changed_units(ex["w_down"], d["w_down"], 1))
  # Kept units are exact copies: the expert computes the dense MLP restricted to its kept units.
  x = jax.random.normal(jax.random.key(5), (10, 32))
  keep = ~gate[0]
  expert0 = {k: v[0] * (keep[:, None] if k == "w_down" else 1) for k, v in ex.items()}
  y_expert = mlp.apply(expert0, x, "swiglu")
  y_dense = mlp.apply({**d, "w_down": d["w_down"] * keep[:, None]}, x, "swiglu")
  np.testing.assert_allclose(y_expert, y_dense, atol=1e-5)


def test_noise_and_drop_compose_and_differ():
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=2)
  dp = dense_params(dense_cfg)
  run = lambda **kw: upcycle.upcycle(dp, dense_cfg, moe_cfg, config.UpcycleConfig(**kw), jax.random.key(1))
  noise, drop = run(expert_noise_std=0.05), run(drop_ratio=0.25)
  both = run(expert_noise_std=0.05, drop_ratio=0.25)
  w0 = dp["layers"]["1"]["mlp"]["w_up"]
  wn, wd, wb = (p["layers"]["1"]["moe"]["experts"]["w_up"] for p in (noise, drop, both))
  # Noise touches every entry a little; drop replaces whole units and leaves the rest exact.
  assert bool(jnp.all(wn != w0[None]))
  dropped = _changed_units(wd, w0, 2)
  assert bool(jnp.all(wd.transpose(0, 2, 1)[~dropped] == w0.T[None].repeat(4, 0)[~dropped]))
  # Together: dropped units are the drop-only ones, the others carry the noise-only values.
  np.testing.assert_array_equal(wb.transpose(0, 2, 1)[dropped], wd.transpose(0, 2, 1)[dropped])
  np.testing.assert_array_equal(wb.transpose(0, 2, 1)[~dropped], wn.transpose(0, 2, 1)[~dropped])


# ----------------------------------------------------------------------------------------------------------
# Errors name the paths and shapes
# ----------------------------------------------------------------------------------------------------------


def test_unmatched_target_is_an_error():
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=2)
  rules = tuple(r for r in upcycle.RULES if r[2] is not upcycle.ROUTER)
  rules = tuple(r for r in rules if r[0] != r".+")  # no catch-all copy either
  with pytest.raises(upcycle.UpcycleError, match=r"target 'layers/1/moe/router/w' \[32, 4\] matches no"):
    upcycle.upcycle_params(dense_params(dense_cfg), transformer.specs(moe_cfg), INIT, jax.random.key(0),
                           rules=rules[:1])


def test_unused_dense_param_is_an_error_unless_ignored():
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=2)
  dp = dense_params(dense_cfg)
  dp["extra"] = {"w": jnp.zeros((3, 5))}
  with pytest.raises(upcycle.UpcycleError, match=r"dense 'extra/w' \[3, 5\] is read by no rule"):
    upcycle.upcycle_params(dp, transformer.specs(moe_cfg), INIT, jax.random.key(0))
  out = upcycle.upcycle_params(dp, transformer.specs(moe_cfg), INIT, jax.random.key(0), ignore=[r"extra/.*"])
  assert "extra" not in out
  # upcycle() checks the dense params against their own config first.
  with pytest.raises(upcycle.UpcycleError, match=r"unexpected 'extra/w' \[3, 5\]"):
    upcycle.upcycle(dp, dense_cfg, moe_cfg, INIT)


def test_shape_mismatch_names_both_paths_and_shapes():
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=2)
  dp = dense_params(dense_cfg)
  dp["layers"]["1"]["mlp"]["w_up"] = jnp.zeros((32, 48))
  with pytest.raises(upcycle.UpcycleError, match=re.escape(
      "target 'layers/1/moe/experts/w_up' [4, 32, 64] (to_experts) needs dense 'layers/1/mlp/w_up' of shape "
      "[32, 64], but it is [32, 48]")):
    upcycle.upcycle_params(dp, transformer.specs(moe_cfg), INIT, jax.random.key(0))
  dp = dense_params(dense_cfg)
  dp["layers"]["2"]["attn"]["wq"] = jnp.zeros((32, 2, 8))
  with pytest.raises(upcycle.UpcycleError, match=re.escape(
      "'layers/2/attn/wq' [32, 4, 8] (copy) needs dense 'layers/2/attn/wq' of shape [32, 4, 8], but it is "
      "[32, 2, 8]")):
    upcycle.upcycle_params(dp, transformer.specs(moe_cfg), INIT, jax.random.key(0))
  with pytest.raises(upcycle.UpcycleError,
                     match=r"'layers/2/attn/wq' is \[32, 2, 8\], the config says \[32, 4, 8\]"):
    upcycle.upcycle(dp, dense_cfg, moe_cfg, INIT)


def test_missing_source_names_it():
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=2)
  dp = dense_params(dense_cfg)
  del dp["layers"]["3"]["mlp"]["w_gate"]
  with pytest.raises(upcycle.UpcycleError,
                     match=r"reads dense 'layers/3/mlp/w_gate', which the dense params lack"):
    upcycle.upcycle_params(dp, transformer.specs(moe_cfg), INIT, jax.random.key(0))


@pytest.mark.parametrize("dense_kw, moe_kw, msg", [
  (dict(d_model=48), {}, r"model.d_model: dense 48 != target 32"),
  (dict(num_heads=8), {}, r"model.num_heads: dense 8 != target 4"),
  ({}, dict(d_ff=32), r"model.moe.d_ff=32 makes experts 32 wide, but copying the dense MLP needs its width"
                      r" 64"),
  ({}, dict(num_shared_experts=2), r"shared experts 128 wide .* cannot copy the dense MLP \(64 wide\)"),
  (dict(moe=config.MoEConfig(num_experts=2)), {}, r"the source has model.moe.num_experts=2"),
  ({}, dict(layers=()), None),  # fine
])
def test_check_compatible(dense_kw, moe_kw, msg):
  dense = config.ModelConfig(**{**BASE, **dense_kw})
  moe = config.ModelConfig(**BASE, moe=config.MoEConfig(**{"num_experts": 4, "top_k": 2, **moe_kw}))
  if msg is None:
    upcycle.check_compatible(dense, moe)
  else:
    with pytest.raises(config.ConfigError, match=msg):
      upcycle.check_compatible(dense, moe)


def test_check_compatible_lists_every_problem_and_needs_experts():
  dense = config.ModelConfig(**{**BASE, "d_model": 48, "vocab_size": 100})
  with pytest.raises(config.ConfigError) as e:
    upcycle.check_compatible(dense, config.ModelConfig(**BASE))
  assert "num_experts=0: nothing to upcycle into" in str(e.value)
  assert "model.d_model: dense 48" in str(e.value) and "model.vocab_size: dense 100" in str(e.value)


def test_last_layers():
  assert upcycle.last_layers(6, 2) == (4, 5)
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=2, layers=upcycle.last_layers(4, 2))
  mp = upcycle.upcycle(dense_params(dense_cfg), dense_cfg, moe_cfg, INIT)
  assert [i for i in "0123" if "moe" in mp["layers"][i]] == ["2", "3"]
  with pytest.raises(config.ConfigError, match="n=5"):
    upcycle.last_layers(4, 5)


def test_plan_describe():
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=2)
  steps = upcycle.plan(dense_params(dense_cfg), transformer.specs(moe_cfg))
  by_target = {s.target: s for s in steps}
  assert by_target["layers/1/moe/experts/w_down"].source == "layers/1/mlp/w_down"
  assert by_target["layers/1/moe/experts/w_down"].action is upcycle.TO_EXPERTS
  assert by_target["layers/1/moe/router/w"].source is None
  assert by_target["layers/0/mlp/w_up"].action is upcycle.COPY
  text = upcycle.describe(steps)
  assert "layers/3/moe/experts/w_gate" in text and "params copied unchanged" in text


# ----------------------------------------------------------------------------------------------------------
# Subtrees (CLIP towers) and custom rules
# ----------------------------------------------------------------------------------------------------------


def test_subtree_prefix_two_towers():
  """The same rules work under a prefix: one call upcycles a two-tower tree, each tower its own way."""
  dense_v, moe_v = cfgs("gelu_bias", num_experts=4, top_k=1)
  dense_t, moe_t = cfgs("gelu_bias", num_experts=2, top_k=1, layers=(3,))
  dense = {"vision": dense_params(dense_v, 0), "text": dense_params(dense_t, 7), "logit_scale": jnp.ones(())}
  specs = {"vision": transformer.specs(moe_v), "text": transformer.specs(moe_t),
           "logit_scale": sharding.param(sharding.ones, (), ())}
  out = upcycle.upcycle_params(dense, specs, INIT, jax.random.key(0))
  assert out["vision"]["layers"]["1"]["moe"]["experts"]["w_up"].shape == (4, 32, 64)
  assert "moe" not in out["text"]["layers"]["1"]
  assert out["text"]["layers"]["3"]["moe"]["router"]["w"].shape == (32, 2)
  tok = tokens()
  for tower, dc, mc in (("vision", dense_v, moe_v), ("text", dense_t, moe_t)):
    np.testing.assert_allclose(logits(out[tower], tok, mc), logits(dense[tower], tok, dc), atol=1e-5,
                               rtol=1e-5)


def test_custom_rule_first_match_wins():
  """A user rule placed before the defaults: here, keep layer 3's embedding of a new router at zero."""
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=2)
  rules = ((r"layers/3/moe/router/w", None, upcycle.ZEROS),) + upcycle.RULES
  mp = upcycle.upcycle(dense_params(dense_cfg), dense_cfg, moe_cfg, INIT, jax.random.key(0), rules=rules)
  assert float(jnp.max(jnp.abs(mp["layers"]["3"]["moe"]["router"]["w"]))) == 0.0
  assert float(jnp.max(jnp.abs(mp["layers"]["1"]["moe"]["router"]["w"]))) > 0.0


# ----------------------------------------------------------------------------------------------------------
# Under jit, sharded
# ----------------------------------------------------------------------------------------------------------


def test_sharded_equals_unsharded_and_carries_target_shardings():
  dense_cfg, moe_cfg = cfgs(num_experts=8, top_k=2)
  mesh = sharding.make_mesh(config.MeshConfig(data=2, fsdp=1, expert=4, tensor=1))
  # With noise and drop on: the random draws must not depend on the sharding.
  init = config.UpcycleConfig(expert_noise_std=0.05, drop_ratio=0.25)
  dp = dense_params(dense_cfg)
  ref = upcycle.upcycle(dp, dense_cfg, moe_cfg, init, jax.random.key(1))
  host = jax.tree.map(np.asarray, dp)  # numpy leaves: placed with the dense shardings first, never whole
  out = upcycle.upcycle_sharded(host, dense_cfg, moe_cfg, init, jax.random.key(1), mesh)
  want = sharding.flatten(sharding.param_shardings(transformer.specs(moe_cfg), mesh))
  got = sharding.flatten(out)
  assert list(got) == list(sharding.flatten(ref))
  for path, v in got.items():
    assert v.sharding.is_equivalent_to(want[path], v.ndim), (path, v.sharding, want[path])
    np.testing.assert_allclose(v, sharding.flatten(ref)[path], atol=1e-6, err_msg=path)
  w = got["layers/1/moe/experts/w_up"]
  assert w.sharding.spec[0] == "expert" and w.addressable_shards[0].data.shape == (2, 32, 64)


def test_sharded_accepts_sharded_dense_arrays():
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=1)
  mesh = sharding.make_mesh(config.MeshConfig(data=1, fsdp=2, expert=4, tensor=1))
  dp = jax.device_put(dense_params(dense_cfg), sharding.param_shardings(transformer.specs(dense_cfg), mesh))
  out = upcycle.upcycle_sharded(dp, dense_cfg, moe_cfg, INIT, jax.random.key(1), mesh)
  tok = tokens()
  np.testing.assert_allclose(logits(out, tok, moe_cfg), logits(dp, tok, dense_cfg), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The paper configs
# ----------------------------------------------------------------------------------------------------------


def test_paper_config_eval_shape():
  cfg = registry.get("lm_upcycle_1b_e32")
  dense_cfg = registry.get("lm_dense_1b").model
  m = cfg.model.moe
  assert (m.num_experts, m.top_k, m.every, m.router) == (32, 2, 2, "token_choice")
  assert cfg.init.router_init == "normal" and cfg.init.router_std == 0.02 and cfg.init.continue_step
  upcycle.check_compatible(dense_cfg, cfg.model)
  abstract_dense = sharding.shapes(transformer.specs(dense_cfg))
  out = jax.eval_shape(lambda d, k: upcycle.upcycle(d, dense_cfg, cfg.model, cfg.init, k), abstract_dense,
                       jax.random.key(0))
  want = sharding.shapes(transformer.specs(cfg.model))
  assert jax.tree.structure(out) == jax.tree.structure(want)
  assert jax.tree.leaves(out) == jax.tree.leaves(want)
  assert out["layers"]["23"]["moe"]["experts"]["w_gate"].shape == (32, 2048, 5632)
  assert "mlp" in out["layers"]["22"]


def test_paper_encoder_overrides_apply_to_a_clip_tower():
  experiments = registry.get_fn("lm_upcycle_1b_e32").__globals__
  o = experiments["paper_moe_overrides"]("clip.vision", encoder=True)
  cfg = config.derive(config.ExperimentConfig(task="clip"), o)
  assert cfg.clip.vision.moe.router == "expert_choice" and cfg.clip.vision.moe.capacity_factor == 2.0
  assert cfg.clip.vision.moe.num_experts == 32 and cfg.clip.text.moe.num_experts == 0


# ----------------------------------------------------------------------------------------------------------
# From a dense run's checkpoint (what `init.upcycle_from` does at the start of training)
# ----------------------------------------------------------------------------------------------------------


def test_from_checkpoint_restores_sharded_and_upcycles(tmp_path):
  from moejax import checkpoint

  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=2)
  dp = dense_params(dense_cfg)
  mngr = checkpoint.Manager(tmp_path / "dense", async_save=False)
  mngr.save(7, {"step": jnp.int32(7), "params": dp, "opt_state": {"mu": dp}},
            config.ExperimentConfig(name="dense", model=dense_cfg))
  mngr.close()
  mesh = sharding.make_mesh(config.MeshConfig(data=2, fsdp=1, expert=4, tensor=1))
  want_sh = sharding.flatten(sharding.param_shardings(transformer.specs(moe_cfg), mesh))
  for continue_step, start in ((True, 7), (False, 0)):
    init = config.UpcycleConfig(upcycle_from=str(tmp_path / "dense"), continue_step=continue_step, seed=5,
                                drop_ratio=0.25)
    exp = config.ExperimentConfig(name="moe", model=moe_cfg, init=init)
    params, step = upcycle.from_checkpoint(exp, mesh)
    assert step == start
  ref = sharding.flatten(upcycle.upcycle(dp, dense_cfg, moe_cfg, init))  # key from init.seed, like the run's
  for path, v in sharding.flatten(params).items():
    np.testing.assert_allclose(v, ref[path], atol=1e-6, err_msg=path)
    assert v.sharding.is_equivalent_to(want_sh[path], v.ndim), path


def test_check_experiment_errors():
  dense_cfg, moe_cfg = cfgs(num_experts=4, top_k=2)
  dense_exp = config.ExperimentConfig(name="dense", model=dense_cfg)
  with pytest.raises(config.ConfigError, match="task='lm' checkpoint into a task='clip' model"):
    upcycle.check_experiment(dense_exp, config.ExperimentConfig(task="clip"))
  with pytest.raises(config.ConfigError, match=r"'same' has no experts \(model.moe.num_experts=0\)"):
    upcycle.check_experiment(dense_exp, config.ExperimentConfig(name="same", model=dense_cfg))
  clip = config.ExperimentConfig(task="clip")
  clip_moe = config.derive(clip, {"clip.vision.moe.num_experts": 4, "clip.vision.moe.d_ff": 32})
  with pytest.raises(config.ConfigError, match=r"clip.vision.moe.d_ff=32 makes experts 32 wide"):
    upcycle.check_experiment(clip, clip_moe)
  upcycle.check_experiment(clip, config.derive(clip, {"clip.vision.moe.num_experts": 4}))


@pytest.mark.slow  # ~10 s alone, ~50 s on a loaded 2-core machine: four tower compiles
def test_upcycle_experiment_clip_both_towers_preserve_embeddings():
  """A two-tower CLIP goes through the same rules in one call (prefixes `vision/`, `text/`); with biases,
  LayerNorm and GELU experts, both embeddings are the dense model's at step 0."""
  from moejax import tasks
  from moejax.models import two_tower

  dense_exp = config.ExperimentConfig(name="clip_dense", task="clip")
  exp = config.derive(dense_exp, {"name": "clip_moe", "clip.vision.moe.num_experts": 4,
                                  "clip.text.moe.num_experts": 2, "clip.text.moe.top_k": 1})
  dense_specs = tasks.get("clip").specs(dense_exp)
  leaves, tree = jax.tree.flatten(sharding.init_params(jax.random.key(0), dense_specs))
  keys = jax.random.split(jax.random.key(1), len(leaves))
  dp = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
  mesh = sharding.make_mesh(config.MeshConfig(data=2, fsdp=1, expert=4, tensor=1))
  mp = upcycle.upcycle_experiment(dp, dense_exp, exp, mesh)
  assert mp["vision"]["layers"]["1"]["moe"]["experts"]["b_up"].shape == (4, 256)
  assert mp["text"]["layers"]["1"]["moe"]["router"]["w"].shape == (64, 2)
  c = dense_exp.clip
  images = jax.random.uniform(jax.random.key(2), (2, c.image_size, c.image_size, c.channels))
  toks = jax.random.randint(jax.random.key(3), (2, c.text.max_seq_len), 1, c.text.vocab_size)
  for enc, inp in ((two_tower.encode_image, images), (two_tower.encode_text, toks)):
    enc = jax.jit(lambda p, x, cfg, enc=enc: enc(p, x, cfg)[0], static_argnums=2)
    np.testing.assert_allclose(enc(mp, inp, exp), enc(dp, inp, dense_exp), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------------


def test_bench_runs_small(tmp_path, capsys):
  """`--json` stores the seconds, params and bytes with the model and where they were measured; the printed table
  and scripts/bench_results.py's block are both drawn from those fields alone."""
  from run_helpers import script

  from moejax.bench import upcycle as bench

  argv = ["--d-model", "32", "--heads", "4", "--layers", "2", "--d-ff", "64", "--vocab", "64",
          "--experts", "4", "--drop", "0.5", "--repeats", "1", "--fresh-pages", "--json", str(tmp_path / "b.json")]
  assert bench.main(argv) == 0  # --fresh-pages: leave this test process's allocator alone
  out = capsys.readouterr().out
  d = json.loads((tmp_path / "b.json").read_text())
  assert [(r["experts"], r["drop"]) for r in d["rows"]] == [(4, 0.0), (4, 0.5)] and d["allocator"] == "glibc default"
  assert min(r[k] for r in d["rows"] for k in ("copy_dense_s", "copy_moe_s", "upcycle_s")) > 0
  assert d["provenance"]["command"] == "moejax bench upcycle " + " ".join(argv)
  text = script("bench_results").BLOCKS["upcycle in memory, glibc allocator"][2](d)
  assert "| 4 | 0 | 0 |" in text and "| 4 | 0 | 0.5 |" in text and d["provenance"]["command"] in text
  assert "allocator: glibc default" in text and bench.table(d) in text and bench.table(d) in out


def test_bench_end_to_end_small(tmp_path):
  from run_helpers import script

  from moejax.bench import upcycle as bench

  argv = ["--d-model", "32", "--heads", "4", "--layers", "2", "--d-ff", "64", "--vocab", "256",
          "--experts", "4", "--repeats", "1", "--end-to-end", "--json", str(tmp_path / "e2e.json")]
  assert bench.main(argv) == 0
  d = json.loads((tmp_path / "e2e.json").read_text())
  (row,) = d["rows"]
  assert row["experts"] == 4 and row["dense_ckpt_bytes"] > 0 and row["moe_ckpt_bytes"] > 0
  assert min(row["cp_s"], row["orbax_copy_s"], row["upcycle_s"]) > 0 and d["end_to_end"]
  text = script("bench_results").BLOCKS["upcycle end to end"][2](d)
  assert "| 4 |" in text and "orbax restore + save" in text and "local disk" in text


def test_bench_bytes_moved_floor():
  from moejax.bench import upcycle as bench

  # Copying 100 bytes moves 200; upcycling them into 350 moves 450.
  assert bench.floor({"dense_bytes": 100, "moe_bytes": 350}) == pytest.approx(2.25)
  assert bench.floor({"dense_bytes": 100, "moe_bytes": 100}) == pytest.approx(1.0)
