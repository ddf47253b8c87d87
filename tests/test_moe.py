"""The MoE layer against a plain per-expert-loop reference: every dispatch path and gmm backend, outputs and
gradients; capacity drops counted exactly; aux losses, shared experts, bias balancing, the decoder."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import config, sharding
from moejax.layers import mlp, moe
from moejax.models import transformer


def _close(a, b, tol=1e-5):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, (a.shape, b.shape)
  err = np.max(np.abs(a - b))
  assert err <= tol * max(1.0, np.max(np.abs(b))), f"max abs err {err:.3g} (scale {np.max(np.abs(b)):.3g})"


def _cfg(**moe_kw) -> config.ModelConfig:
  model_kw = {k: moe_kw.pop(k) for k in ("activation", "bias") if k in moe_kw}
  m = dict(num_experts=4, top_k=2, capacity_factor=1.0, load_balance_weight=0.01, z_loss_weight=1e-3)
  m.update(moe_kw)
  return config.ModelConfig(d_model=16, d_ff=24, moe=config.MoEConfig(**m), **model_kw)


def _params(cfg, seed=0):
  p = sharding.init_params(jax.random.PRNGKey(seed), moe.specs(cfg))
  # Biases start at zero; make them non-zero so the test sees them. A larger router std spreads the routing.
  p["router"]["w"] = p["router"]["w"] * 50.0
  for k in ("b_gate", "b_up", "b_down"):
    if k in p["experts"]:
      p["experts"][k] = 0.1 * jax.random.normal(jax.random.PRNGKey(7), p["experts"][k].shape)
  return p


def _x(B=2, T=16, D=16, seed=1):
  return jax.random.normal(jax.random.PRNGKey(seed), (B, T, D))


# ----------------------------------------------------------------------------------------------------------
# Reference: every expert as a dense MLP over all tokens, combined by per-token loops over the choices.
# ----------------------------------------------------------------------------------------------------------


def _expert(ex, e):
  return {k: v[e] for k, v in ex.items()}


def _routing_np(p, x, cfg):
  """Concrete routing decisions (piecewise constant, so they are constants for the gradient)."""
  m = cfg.moe
  logits = np.einsum("btd,de->bte", np.asarray(x, np.float64), np.asarray(p["router"]["w"], np.float64))
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  B, T, E = probs.shape
  if m.router == "expert_choice":
    C = int(np.ceil(m.capacity_factor * T / E))
    mask = np.zeros((B, T, E), bool)
    for b in range(B):
      for e in range(E):
        mask[b, np.argsort(-probs[b, :, e], kind="stable")[:C], e] = True
    return mask, None
  sel = probs + (np.asarray(p["router"]["bias"]) if "bias" in p["router"] else 0.0)
  idx = np.argsort(-sel, -1, kind="stable")[..., :m.top_k]
  keep = np.ones(idx.shape, bool)
  if m.dispatch == "capacity":
    C = int(np.ceil(m.capacity_factor * m.top_k * T / E))
    for b in range(B):
      count = np.zeros(E, int)
      for j in range(m.top_k):  # top-1 choices of the whole sequence first
        for t in range(T):
          e = idx[b, t, j]
          keep[b, t, j] = count[e] < C
          count[e] += 1
  return idx, keep


def reference(p, x, cfg, routing):
  m = cfg.moe
  E = m.num_experts
  logits = jnp.einsum("btd,de->bte", x.astype(jnp.float32), p["router"]["w"])
  probs = jax.nn.softmax(logits, -1)
  outs = jnp.stack([mlp.apply(_expert(p["experts"], e), x, cfg.activation) for e in range(E)])  # [E, B, T, D]
  if m.router == "expert_choice":
    mask, _ = routing
    return jnp.einsum("bte,bte,ebtd->btd", jnp.asarray(mask, jnp.float32), probs, outs)
  idx, keep = routing
  w = jnp.take_along_axis(probs, jnp.asarray(idx), -1)
  if m.renormalize:
    w = w / jnp.sum(w, -1, keepdims=True)
  y = jnp.zeros_like(x)
  for j in range(m.top_k):
    onehot = jax.nn.one_hot(idx[..., j], E) * (w[..., j] * keep[..., j])[..., None]
    y = y + jnp.einsum("bte,ebtd->btd", onehot, outs)
  return y


def _check_against_reference(cfg, x=None, seed=0):
  p = _params(cfg, seed)
  x = _x() if x is None else x
  routing = _routing_np(p, x, cfg)
  y, aux = jax.jit(lambda p, x: moe.apply(p, x, cfg))(p, x)
  _close(y, reference(p, x, cfg, routing))
  g = jax.random.normal(jax.random.PRNGKey(3), x.shape)
  got = jax.jit(jax.grad(lambda p, x: jnp.sum(moe.apply(p, x, cfg)[0] * g), argnums=(0, 1)))(p, x)
  want = jax.grad(lambda p, x: jnp.sum(reference(p, x, cfg, routing) * g), argnums=(0, 1))(p, x)
  for (path, a), b in zip(sharding.flatten(got).items(), sharding.flatten(want).values()):
    if "router/bias" not in path:
      _close(a, b, 1e-5)
  return p, x, y, aux, routing


@pytest.mark.parametrize("backend", ["sorted", "ragged_dot", "dense"])
@pytest.mark.parametrize("activation,bias", [("swiglu", False), ("gelu", True)])
def test_dropless_matches_reference(backend, activation, bias):
  cfg = _cfg(dispatch="dropless", gmm_backend=backend, activation=activation, bias=bias)
  *_, aux, _ = _check_against_reference(cfg)
  assert float(aux["dropped_fraction"]) == 0.0


def test_dropless_sorted_uneven_groups_and_renormalize_off():
  # A strongly skewed router: one expert gets most tokens, another none; several TILE-sized groups.
  cfg = _cfg(dispatch="dropless", gmm_backend="sorted", renormalize=False, num_experts=4, top_k=1)
  p = _params(cfg)
  p["router"]["w"] = p["router"]["w"].at[:, 0].add(0.5)
  x = _x(B=4, T=32)
  routing = _routing_np(p, x, cfg)
  y, aux = moe.apply(p, x, cfg)
  _close(y, reference(p, x, cfg, routing))
  counts = np.bincount(routing[0].reshape(-1), minlength=4)
  _close(aux["expert_load"], counts / counts.sum())


@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_matches_reference_and_counts_drops(top_k):
  cfg = _cfg(dispatch="capacity", capacity_factor=0.75, top_k=top_k)
  *_, aux, (idx, keep) = _check_against_reference(cfg)
  n_dropped = int((~keep).sum())
  assert n_dropped > 0  # the test must exercise dropping
  np.testing.assert_allclose(float(aux["dropped_fraction"]), n_dropped / keep.size, rtol=1e-6)
  # Drops happen only where an expert's slots ran out, and top-1 choices are kept before top-2 ones.
  if top_k == 2:
    assert (~keep[..., 0]).sum() <= (~keep[..., 1]).sum()


def test_capacity_large_factor_equals_dropless():
  x = _x()
  a = moe.apply(_params(_cfg(dispatch="capacity", capacity_factor=4.0)), x, _cfg(dispatch="capacity",
                                                                                   capacity_factor=4.0))
  b = moe.apply(_params(_cfg(dispatch="dropless")), x, _cfg(dispatch="dropless"))
  _close(a[0], b[0])
  assert float(a[1]["dropped_fraction"]) == 0.0


@pytest.mark.parametrize("cf", [1.0, 2.0])
def test_expert_choice_matches_reference(cf):
  cfg = _cfg(router="expert_choice", capacity_factor=cf)
  *_, aux, (mask, _) = _check_against_reference(cfg)
  np.testing.assert_allclose(float(aux["dropped_fraction"]), np.mean(~mask.any(-1)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(aux["expert_load"]), 0.25, rtol=1e-6)


def test_shared_experts_with_gate():
  cfg = _cfg(num_shared_experts=2, shared_gate=True)
  p = _params(cfg)
  assert p["shared"]["w_up"].shape == (16, 48) and p["shared_gate"]["w"].shape == (16, 1)
  x = _x()
  y, _ = moe.apply(p, x, cfg)
  routed = reference(p, x, cfg, _routing_np(p, x, cfg))
  gate = jax.nn.sigmoid(jnp.einsum("btd,do->bto", x, p["shared_gate"]["w"]))
  _close(y, routed + gate * mlp.apply(p["shared"], x, cfg.activation))


def test_bias_balancing_selection_and_update():
  cfg = _cfg(bias_balance_rate=0.1, top_k=1)
  p = _params(cfg)
  assert p["router"]["bias"].shape == (4,)
  assert moe.non_trainable("layers/3/moe/router/bias") and not moe.non_trainable("layers/3/moe/router/w")
  assert moe.non_trainable("layers/1/moe/router/map")  # an EEP merge's R: searched, never trained
  p["router"]["bias"] = jnp.array([0.0, 5.0, 0.0, 0.0])  # forces expert 1, weights unchanged
  _check_against_reference(cfg)
  y, aux = moe.apply(p, _x(), cfg)
  np.testing.assert_allclose(np.asarray(aux["expert_load"]), [0, 1, 0, 0])
  params = {"layers": {"1": {"moe": p}, "3": {"moe": _params(cfg)}}}
  new = moe.update_router_bias(params, {"1": aux}, cfg)
  # Overloaded expert 1 is pushed down, the idle ones up, by exactly the rate; layer 3 untouched.
  np.testing.assert_allclose(np.asarray(new["layers"]["1"]["moe"]["router"]["bias"]), [0.1, 4.9, 0.1, 0.1])
  np.testing.assert_array_equal(np.asarray(new["layers"]["3"]["moe"]["router"]["bias"]), 0.0)
  with pytest.raises(KeyError, match="'7'"):
    moe.update_router_bias(params, {"7": aux}, cfg)


def _clip_exp(**over) -> config.ExperimentConfig:
  tower = config.ModelConfig(d_model=16, d_ff=24, num_layers=1, moe=config.MoEConfig(num_experts=4, every=1, offset=0))
  return config.derive(config.ExperimentConfig(task="clip", clip=config.ClipConfig(vision=tower, text=tower)), over)


def test_bias_balancing_clip_towers_each_at_their_own_rate():
  exp = _clip_exp(**{"clip.vision.moe.bias_balance_rate": 0.1, "clip.text.moe.bias_balance_rate": 0.25})
  zeros = {"moe": {"router": {"bias": jnp.zeros(4)}}}
  params = {"vision": {"layers": {"0": zeros}}, "text": {"layers": {"0": zeros}}}
  aux = {"vision/0": {"expert_load": jnp.array([0.7, 0.1, 0.1, 0.1])},
         "text/0": {"expert_load": jnp.array([0.1, 0.1, 0.1, 0.7])}}
  new = moe.balance_router_biases(params, aux, exp)
  np.testing.assert_allclose(new["vision"]["layers"]["0"]["moe"]["router"]["bias"], [-0.1, 0.1, 0.1, 0.1])
  np.testing.assert_allclose(new["text"]["layers"]["0"]["moe"]["router"]["bias"], [0.25, 0.25, 0.25, -0.25])
  # only the text tower balances: the vision biases stay where they are
  exp = _clip_exp(**{"clip.text.moe.bias_balance_rate": 0.25})
  new = moe.balance_router_biases(params, aux, exp)
  np.testing.assert_array_equal(new["vision"]["layers"]["0"]["moe"]["router"]["bias"], 0.0)


def test_bias_balancing_shared_backbone_averages_both_modalities():
  exp = _clip_exp(**{"clip.shared_backbone": True, "clip.vision.moe.bias_balance_rate": 0.1})
  params = {"vision": {}, "text": {}, "shared": {"layers": {"0": {"moe": {"router": {"bias": jnp.zeros(4)}}}}}}
  # Averaged loads [0.4, 0.1, 0.15, 0.35] (mean 0.25): expert 3, under-used by images alone, is over the mean.
  aux = {"vision/0": {"expert_load": jnp.array([0.7, 0.1, 0.1, 0.1])},
         "text/0": {"expert_load": jnp.array([0.1, 0.1, 0.2, 0.6])}}
  new = moe.balance_router_biases(params, aux, exp)
  np.testing.assert_allclose(new["shared"]["layers"]["0"]["moe"]["router"]["bias"], [-0.1, 0.1, 0.1, -0.1])


def test_aux_losses_change_the_gradients():
  x = _x()

  def router_grad(lb, z):
    cfg = _cfg(load_balance_weight=lb, z_loss_weight=z)
    p = _params(cfg)
    f = lambda p: (lambda y, aux: jnp.sum(y) + aux["aux_loss"])(*moe.apply(p, x, cfg))
    return jax.grad(f)(p)["router"]["w"]

  base = router_grad(0.0, 0.0)
  assert not np.allclose(router_grad(1.0, 0.0), base, atol=1e-6)
  assert not np.allclose(router_grad(0.0, 1.0), base, atol=1e-6)


def test_specs_paths_and_axes():
  cfg = _cfg(activation="swiglu", bias=True)
  s = sharding.flatten(moe.specs(cfg), is_leaf=sharding.is_spec)
  assert s["router/w"].shape == (16, 4) and s["router/w"].axes == ("embed", None)
  assert s["experts/w_gate"].shape == (4, 16, 24) and s["experts/w_gate"].axes == ("expert", "embed", "mlp")
  assert s["experts/w_down"].shape == (4, 24, 16)
  assert s["experts/b_up"].shape == (4, 24) and s["experts/b_down"].shape == (4, 16)
  assert "router/bias" not in s and "shared/w_up" not in s


def test_bad_input_errors():
  with pytest.raises(config.ConfigError, match="top_k=5"):
    _cfg(top_k=5)
  with pytest.raises(config.ConfigError, match="capacity_factor"):
    _cfg(capacity_factor=0.0)
  with pytest.raises(config.ConfigError, match="'switch'"):
    _cfg(router="switch")
  with pytest.raises(config.ConfigError, match="'dropful'"):
    _cfg(dispatch="dropful")
  cfg = _cfg()
  with pytest.raises(ValueError, match="d_model=16"):
    moe.apply(_params(cfg), jnp.zeros((2, 4, 8)), cfg)
  with pytest.raises(ValueError, match="num_experts=8"):
    moe.apply(_params(cfg), _x(), _cfg(num_experts=8))


def test_decoder_with_moe_layers():
  cfg = config.ModelConfig(vocab_size=32, d_model=16, num_layers=2, num_heads=2, d_ff=32, max_seq_len=16,
                           moe=config.MoEConfig(num_experts=4, top_k=2, every=2, offset=1))
  params = sharding.init_params(jax.random.PRNGKey(0), transformer.specs(cfg))
  assert params["layers"]["1"]["moe"]["experts"]["w_up"].shape == (4, 16, 32)
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 32)

  def loss(p):
    logits, aux = transformer.forward(p, tokens, cfg, train=True, rng=jax.random.PRNGKey(2))
    return jnp.mean(logits ** 2) + aux["aux_loss"], aux

  (val, aux), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  assert np.isfinite(float(val)) and list(aux["moe"]) == ["1"]
  assert aux["moe"]["1"]["expert_load"].shape == (4,)
  np.testing.assert_allclose(float(jnp.sum(aux["moe"]["1"]["expert_load"])), 1.0, rtol=1e-6)
  for path, g in sharding.flatten(grads).items():
    assert np.all(np.isfinite(np.asarray(g))), path
  assert float(jnp.abs(grads["layers"]["1"]["moe"]["router"]["w"]).sum()) > 0


def test_moe_experiments_resolve_and_mixtral_eval_shape():
  from moejax import registry

  tiny = registry.get("lm_moe_tiny")
  assert [i for i in range(tiny.model.num_layers) if tiny.model.moe.is_moe_layer(i)] == [1, 3]
  assert tiny.model.moe.num_experts == 8 and tiny.model.moe.top_k == 2
  assert registry.get("lm_moe_tiny_ep").mesh.expert == 4
  cfg = registry.get("lm_mixtral_8x7b").model
  assert round(transformer.num_params(cfg) / 1e9, 1) == 46.7
  assert round(transformer.num_params(cfg, active=True) / 1e9, 1) == 12.9
  shapes = jax.eval_shape(lambda k: sharding.init_params(k, transformer.specs(cfg)), jax.random.PRNGKey(0))
  assert shapes["layers"]["31"]["moe"]["experts"]["w_down"].shape == (8, 14336, 4096)
  logits = jax.eval_shape(lambda p, t: transformer.forward(p, t, cfg)[0], shapes,
                          jax.ShapeDtypeStruct((1, 16), jnp.int32))
  assert logits.shape == (1, 16, 32000)


def test_layer_shapes_dtypes_and_no_retrace():
  """chex: output and aux shapes / dtypes, and a jitted layer traces once for new values of the same shapes
  (routing is data-dependent, but only through values: no shape or Python branch depends on them)."""
  import chex

  cfg = _cfg(dispatch="capacity", capacity_factor=0.75)
  p = _params(cfg)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def layer(p, x, mask):
    return moe.apply(p, x, cfg, mask_BT=mask)

  for seed in range(3):
    x = _x(seed=seed + 10)
    mask = jnp.arange(16)[None, :] < jnp.array([[16], [9 + seed]])
    y, aux = layer(p, x, mask)
    chex.assert_shape(y, x.shape)
    chex.assert_type(y, jnp.float32)
    chex.assert_shape([aux[k] for k in ("aux_loss", "load_balance_loss", "z_loss", "dropped_fraction",
                                        "router_entropy")], ())
    chex.assert_shape(aux["expert_load"], (4,))
    chex.assert_tree_all_finite((y, aux))
    # padding is not routed: its routed output is exactly zero (no shared experts here)
    np.testing.assert_array_equal(np.asarray(y)[~np.asarray(mask)], 0.0)
  chex.clear_trace_counter()
