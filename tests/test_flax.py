"""The Flax front door: NNX / Linen MoE modules == the functional layer, shardings == moejax's, upcycling of
user-written NNX and Linen models (function preserving at step 0, trainable), moejax models both ways."""

import importlib.util
import pathlib
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import moejax.flax
from moejax import config, sharding
from moejax.layers import moe
from moejax.models import transformer
from moejax.upcycle import core

D, F, E = 8, 16, 4

# ----------------------------------------------------------------------------------------------------------
# The MoE modules against layers/moe.py
# ----------------------------------------------------------------------------------------------------------

CASES = {
  "swiglu_dropless": dict(activation="swiglu", bias=False, moe=config.MoEConfig(num_experts=E, top_k=2)),
  "gelu_capacity_shared": dict(activation="gelu_tanh", bias=True, moe=config.MoEConfig(
    num_experts=E, top_k=2, dispatch="capacity", capacity_factor=1.0, num_shared_experts=1, shared_gate=True,
    renormalize=False)),
}


def _loss(y_BTD, aux, r_BTD):
  return jnp.sum(y_BTD * r_BTD) + aux


@pytest.mark.parametrize("case", sorted(CASES))
def test_nnx_and_linen_moe_equal_functional_layer(case):
  kw = CASES[case]
  x_BTD = jax.random.normal(jax.random.key(1), (2, 6, D))
  r_BTD = jax.random.normal(jax.random.key(2), (2, 6, D))
  m = moejax.flax.MoE(D, F, kw["moe"], activation=kw["activation"], bias=kw["bias"], rngs=nnx.Rngs(0))
  p = m.params()
  chex_shapes = jax.tree.map(jnp.shape, p)
  assert chex_shapes == jax.tree.map(lambda s: s.shape, moe.specs(m.cfg), is_leaf=sharding.is_spec)

  def f_ref(params):
    y, aux = moe.apply(params, x_BTD, m.cfg)
    return _loss(y, aux["aux_loss"], r_BTD), (y, aux)

  (_, (y_ref, aux_ref)), g_ref = jax.jit(jax.value_and_grad(f_ref, has_aux=True))(p)

  def f_nnx(model):
    y, aux, metrics = nnx.capture(model, moejax.flax.AuxLoss, moejax.flax.RouterMetrics)(x_BTD)
    return _loss(y, moejax.flax.sum_named(aux), r_BTD), (y, metrics)

  (_, (y_nnx, metrics)), g_nnx = nnx.jit(nnx.value_and_grad(f_nnx, has_aux=True))(m)
  np.testing.assert_allclose(y_nnx, y_ref, atol=1e-5)
  for k in ("expert_load", "z_loss", "load_balance_loss", "dropped_fraction", "router_entropy"):
    np.testing.assert_allclose(moejax.flax.collect(metrics, k)[""], aux_ref[k], atol=1e-6)
  g_nnx = sharding.flatten(nnx.to_pure_dict(g_nnx))
  for path, g in sharding.flatten(g_ref).items():
    np.testing.assert_allclose(g_nnx[path], g, atol=1e-5, err_msg=path)

  lin = moejax.flax.linen.MoE(F, kw["moe"], activation=kw["activation"], bias=kw["bias"])
  variables = moejax.flax.linen.variables(p, moe.specs(m.cfg))
  init_shapes = jax.tree.map(jnp.shape, nn.unbox(lin.init(jax.random.key(0), x_BTD)["params"]))
  assert init_shapes == chex_shapes  # what the Linen module declares is moejax's tree

  def f_lin(params):
    y, state = lin.apply({"params": params}, x_BTD, mutable=["intermediates"])
    return _loss(y, moejax.flax.sum_named(state["intermediates"]), r_BTD), (y, state["intermediates"])

  (_, (y_lin, inter)), g_lin = jax.jit(jax.value_and_grad(f_lin, has_aux=True))(variables["params"])
  np.testing.assert_allclose(y_lin, y_ref, atol=1e-5)
  np.testing.assert_allclose(moejax.flax.collect(inter, "expert_load")[""], aux_ref["expert_load"], atol=1e-6)
  for path, g in sharding.flatten(g_ref).items():
    np.testing.assert_allclose(sharding.flatten(moejax.flax.linen.params(g_lin))[path], g, atol=1e-5, err_msg=path)


def test_partition_specs_equal_moejax_on_8_devices():
  mesh = sharding.make_mesh(config.MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  m_cfg = config.MoEConfig(num_experts=E, top_k=2, num_shared_experts=1, shared_gate=True)
  with jax.set_mesh(mesh):  # Flax's way: params born sharded (eager sharding)
    m = moejax.flax.MoE(D, F, m_cfg, bias=True, rngs=nnx.Rngs(0))
  want = {p: s.spec for p, s in sharding.flatten(sharding.param_shardings(moe.specs(m.cfg), mesh)).items()}
  assert want["experts/w_up"] == jax.sharding.PartitionSpec("expert", "fsdp", "tensor")
  nnx_specs = sharding.flatten(nnx.to_pure_dict(nnx.get_partition_spec(nnx.state(m, nnx.Param))))
  assert nnx_specs == want
  arrays = sharding.flatten(m.params())
  assert {p: a.sharding.spec for p, a in arrays.items()} == want

  lin = moejax.flax.linen.MoE(F, m_cfg, bias=True)
  abstract = jax.eval_shape(lambda: lin.init(jax.random.key(0), jnp.zeros((2, 4, D))))
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(abstract), mesh, moejax.flax.axis_rules(mesh))
  assert {p: s.spec for p, s in sharding.flatten(shardings["params"]).items()} == want


def test_spec_for_a_mesh_without_some_moejax_axes():
  """docs name a (fsdp, expert, tensor) mesh: its missing `data` axis counts as size 1, as in common.py."""
  mesh = jax.make_mesh((2, 2, 2), ("fsdp", "expert", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
  P = jax.sharding.PartitionSpec
  assert sharding.spec_for(("batch", "seq", "act_embed"), mesh) == P(("fsdp", "expert"), None, None)
  assert sharding.spec_for(("expert", "embed", "mlp"), mesh) == P("expert", "fsdp", "tensor")
  assert sharding.batch_divisor(mesh) == 4
  assert sharding.data_sharding(mesh).spec == P(("fsdp", "expert"), None)


def _close(got, want):
  # float32 ops: the mesh sums the same terms in another order (and exchanges rows by all_to_all), ~1e-7
  # relative per sum over D or F terms; 1e-5 of the values' scale leaves room for the layer's few sums.
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, float(np.max(np.abs(want)))), rtol=0)


@pytest.mark.parametrize("mode", ["auto", "explicit", "explicit_set_mesh", "explicit_jax_mesh_only"])
def test_nnx_moe_under_a_user_mesh_equals_single_device(mode):
  """A user's 3-axis mesh (no `data`), Auto axes or Explicit ones (`jax.make_mesh`'s default), with moejax's
  `use_mesh` (expert parallelism: the layer's shard_map); `explicit_set_mesh` adds `jax.set_mesh` with params
  born sharded and a sharded input; `explicit_jax_mesh_only` has `jax.set_mesh` alone (no expert parallelism:
  the gathers and grouped matmuls meet Explicit shardings). Outputs, aux and gradients equal one device's."""
  m_cfg = config.MoEConfig(num_experts=E, top_k=2)
  model = moejax.flax.MoE(D, F, m_cfg, rngs=nnx.Rngs(0))
  x_BTD = jax.random.normal(jax.random.key(1), (8, 6, D))
  r_BTD = jax.random.normal(jax.random.key(2), (8, 6, D))

  def loss_fn(m, x):
    y, aux = nnx.capture(m, moejax.flax.AuxLoss)(x)
    return _loss(y, moejax.flax.sum_named(aux), r_BTD), (y, moejax.flax.sum_named(aux))

  step = nnx.jit(nnx.value_and_grad(loss_fn, has_aux=True))
  (_, (y_ref, aux_ref)), g_ref = step(model, x_BTD)

  types = (jax.sharding.AxisType.Auto if mode == "auto" else jax.sharding.AxisType.Explicit,) * 3
  mesh = jax.make_mesh((2, 2, 2), ("fsdp", "expert", "tensor"), axis_types=types)
  with sharding.use_mesh(None if mode == "explicit_jax_mesh_only" else mesh):
    if mode != "auto" and mode != "explicit":
      with jax.set_mesh(mesh):
        model = moejax.flax.MoE(D, F, m_cfg, rngs=nnx.Rngs(0), params=model.params())
        assert model.experts["w_up"][...].sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", "tensor")
        x_BTD = jax.device_put(x_BTD, jax.sharding.PartitionSpec(("fsdp", "expert")))
        (_, (y, aux)), g = step(model, x_BTD)
        assert jax.typeof(y).sharding.spec == jax.typeof(x_BTD).sharding.spec  # y is sharded as x is
    else:
      (_, (y, aux)), g = step(model, x_BTD)
    y_eager = model(x_BTD)  # a plain call, outside jit
  _close(y, y_ref)
  _close(y_eager, y_ref)
  _close(aux, aux_ref)
  g_ref = sharding.flatten(nnx.to_pure_dict(g_ref))
  for path, gr in sharding.flatten(nnx.to_pure_dict(g)).items():
    _close(gr, g_ref[path])


def test_nnx_plain_call_is_quiet_and_jit_grad_can_close_over_the_module():
  """Outside `nnx.capture` nothing is sown: no DeprecationWarning, the module is left as it was, and a plain
  `jax.jit` / `jax.grad` closing over the module works as it does over an `nnx.Linear`."""
  model = moejax.flax.MoE(D, F, config.MoEConfig(num_experts=E, top_k=2), rngs=nnx.Rngs(0))
  cfg = config.ModelConfig(vocab_size=32, d_model=D, num_layers=2, num_heads=2, d_ff=F,
                           moe=config.MoEConfig(num_experts=E, top_k=2))
  lm = moejax.flax.Transformer(cfg, rngs=nnx.Rngs(0))
  x_BTD = jax.random.normal(jax.random.key(1), (2, 6, D))
  before = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = model(x_BTD)
    model(x_BTD, deterministic=True)
    lm(_tokens())
  assert [str(w.message) for w in caught] == []
  after = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model)))
  assert jax.tree.structure(after) == jax.tree.structure(before)  # no sown attribute appeared

  want, aux = moe.apply(model.params(), x_BTD, model.cfg)
  np.testing.assert_array_equal(y, want)
  np.testing.assert_allclose(jax.jit(lambda x: model(x))(x_BTD), want, atol=1e-6)
  g = jax.grad(lambda x: jnp.sum(model(x) ** 2))(x_BTD)
  g_want = jax.grad(lambda x: jnp.sum(moe.apply(model.params(), x, model.cfg)[0] ** 2))(x_BTD)
  np.testing.assert_allclose(g, g_want, atol=1e-6)
  assert jax.jit(lambda t: lm(t))(_tokens()).shape == (4, 8, 32)
  _, got = nnx.capture(model, moejax.flax.AuxLoss)(x_BTD)  # capture still collects
  np.testing.assert_allclose(moejax.flax.sum_named(got), aux["aux_loss"], atol=1e-7)

# ----------------------------------------------------------------------------------------------------------
# A user's NNX model (SwiGLU, Llama names) and Linen model (GELU with biases, Dense_i names), upcycled
# ----------------------------------------------------------------------------------------------------------


class SwiGLU(nnx.Module):
  def __init__(self, d, f, rngs):
    self.gate_proj = nnx.Linear(d, f, use_bias=False, rngs=rngs)
    self.up_proj = nnx.Linear(d, f, use_bias=False, rngs=rngs)
    self.down_proj = nnx.Linear(f, d, use_bias=False, rngs=rngs)

  def __call__(self, x):
    return self.down_proj(nnx.silu(self.gate_proj(x)) * self.up_proj(x))


class NNXBlock(nnx.Module):
  def __init__(self, d, rngs):
    self.norm1 = nnx.RMSNorm(d, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=2, in_features=d, decode=False, rngs=rngs)
    self.norm2 = nnx.RMSNorm(d, rngs=rngs)
    self.mlp = SwiGLU(d, F, rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.norm1(x), mask=mask)
    return x + self.mlp(self.norm2(x))


class NNXLM(nnx.Module):
  def __init__(self, rngs, vocab=32, layers=2):
    self.embed = nnx.Embed(vocab, D, rngs=rngs)
    self.layers = nnx.List([NNXBlock(D, rngs) for _ in range(layers)])
    self.head = nnx.Linear(D, vocab, rngs=rngs)

  def __call__(self, tokens):
    x, mask = self.embed(tokens), nnx.make_causal_mask(tokens)
    for layer in self.layers:
      x = layer(x, mask)
    return self.head(x)


def _tokens(key=0, shape=(4, 8)):
  return jax.random.randint(jax.random.key(key), shape, 0, 32)


def _expert_spread(w_E):
  return float(jnp.max(jnp.abs(w_E - w_E[:1])))


def test_upcycle_nnx_model_function_preserving_then_trains():
  model = NNXLM(nnx.Rngs(0))
  tokens, targets = _tokens(0), _tokens(1)
  dense_BTV = model(tokens)
  out = moejax.flax.upcycle(model, select=r"layers/\d+/mlp", moe=config.MoEConfig(num_experts=E, top_k=2))
  assert out is model and all(isinstance(b.mlp, moejax.flax.MoE) for b in model.layers)
  np.testing.assert_allclose(nnx.capture(model, moejax.flax.AuxLoss)(tokens)[0], dense_BTV, atol=1e-5)
  assert _expert_spread(model.layers[0].mlp.experts["w_up"][...]) == 0.0  # copies at step 0

  def loss_fn(m):
    logits, aux = nnx.capture(m, moejax.flax.AuxLoss)(tokens)
    return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean() + moejax.flax.sum_named(aux)

  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(m, o):
    loss, gr = nnx.value_and_grad(loss_fn)(m)
    o.update(m, gr)
    return loss, gr

  loss0, grads = step(model, opt)
  g = grads["layers"][1]["mlp"]
  assert float(jnp.max(jnp.abs(g["router"]["w"][...]))) > 0
  touched = jnp.sum(jnp.max(jnp.abs(g["experts"]["w_down"][...]), axis=(1, 2)) > 0)
  assert int(touched) >= 2  # top-2: at least two experts got tokens and gradient
  losses = [float(loss0)] + [float(step(model, opt)[0]) for _ in range(3)]
  assert losses[-1] < losses[0]
  for layer in model.layers:
    assert _expert_spread(layer.mlp.experts["w_up"][...]) > 1e-4  # the experts now differ


class LinenMlp(nn.Module):
  d_ff: int

  @nn.compact
  def __call__(self, x):  # big_vision's MlpBlock: Dense_0 is up, Dense_1 is down (in creation order)
    h = nn.gelu(nn.Dense(self.d_ff)(x))
    return nn.Dense(x.shape[-1])(h)


class LinenBlock(nn.Module):
  moe: config.MoEConfig | None = None

  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    x = x + nn.SelfAttention(num_heads=2)(h, mask=nn.make_causal_mask(jnp.ones(x.shape[:2])))
    h = nn.LayerNorm()(x)
    if self.moe is None:
      return x + LinenMlp(F, name="mlp")(h)
    return x + moejax.flax.linen.MoE(F, self.moe, activation="gelu_tanh", bias=True, name="mlp")(h)


class LinenLM(nn.Module):
  moe: config.MoEConfig | None = None

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(32, D)(tokens)
    for i in range(2):
      x = LinenBlock(self.moe if i == 1 else None, name=f"block_{i}")(x)
    return nn.Dense(32)(x)


def test_upcycle_linen_params_function_preserving_then_trains():
  tokens, targets = _tokens(0), _tokens(1)
  dense = LinenLM()
  dense_params = dense.init(jax.random.key(0), tokens)["params"]
  m_cfg = config.MoEConfig(num_experts=E, top_k=2)
  params = moejax.flax.upcycle(dense_params, select=r"block_1/mlp", moe=m_cfg)
  assert "Dense_0" in dense_params["block_1"]["mlp"]  # the input tree is left as it was
  boxed = jax.tree.map(lambda v: nn.LogicallyPartitioned(v, names=(None,) * v.ndim), dense_params)
  boxed_out = moejax.flax.upcycle({"params": boxed}, select=r"block_1/mlp", moe=m_cfg)["params"]
  assert boxed_out["block_1"]["mlp"]["experts"]["w_up"].names == ("expert", "embed", "mlp")  # boxed in, boxed out
  jax.tree.map(np.testing.assert_array_equal, nn.unbox(boxed_out), params)
  moe_model = LinenLM(m_cfg)
  want_shapes = jax.tree.map(jnp.shape, nn.unbox(moe_model.init(jax.random.key(0), tokens)["params"]))
  assert jax.tree.map(jnp.shape, params) == want_shapes
  logits, _ = moe_model.apply({"params": params}, tokens, mutable=["intermediates"])
  np.testing.assert_allclose(logits, dense.apply({"params": dense_params}, tokens), atol=1e-5)
  np.testing.assert_array_equal(params["block_1"]["mlp"]["experts"]["b_up"][2],
                                dense_params["block_1"]["mlp"]["Dense_0"]["bias"])

  def loss_fn(p):
    logits, st = moe_model.apply({"params": p}, tokens, mutable=["intermediates"])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
    return ce + moejax.flax.sum_named(st["intermediates"])

  tx = optax.adam(1e-2)
  opt_state = tx.init(params)

  @jax.jit
  def step(p, s):
    loss, gr = jax.value_and_grad(loss_fn)(p)
    upd, s = tx.update(gr, s, p)
    return optax.apply_updates(p, upd), s, gr

  params, opt_state, grads = step(params, opt_state)
  g = grads["block_1"]["mlp"]
  assert float(jnp.max(jnp.abs(g["router"]["w"]))) > 0
  assert int(jnp.sum(jnp.max(jnp.abs(g["experts"]["w_up"]), axis=(1, 2)) > 0)) >= 2
  for _ in range(2):
    params, opt_state, _ = step(params, opt_state)
  assert _expert_spread(params["block_1"]["mlp"]["experts"]["w_up"]) > 1e-4


def test_upcycle_options_reuse_moejax_rules():
  """Drop-Upcycling and shared experts come from upcycle/core.py: same counts, same split, same output."""
  model = NNXLM(nnx.Rngs(0), layers=1)
  init = config.UpcycleConfig(drop_ratio=0.5, expert_noise_std=0.0)
  moejax.flax.upcycle(model, select=r"layers/0/mlp", moe=config.MoEConfig(num_experts=E, top_k=2), init=init)
  w_EDF = model.layers[0].mlp.experts["w_up"][...]
  dense = NNXLM(nnx.Rngs(0), layers=1).layers[0].mlp.up_proj.kernel[...]
  changed_EF = jnp.any(w_EDF != dense[None], axis=1)
  assert [int(n) for n in jnp.sum(changed_EF, -1)] == [core.num_dropped(F, 0.5)] * E
  assert len({tuple(np.flatnonzero(c)) for c in np.asarray(changed_EF)}) > 1  # experts drop different units

  model = NNXLM(nnx.Rngs(0))
  tokens = _tokens(3)
  dense_BTV = model(tokens)
  moejax.flax.upcycle(model, select=r"layers/\d+/mlp",
                      moe=config.MoEConfig(num_experts=E, top_k=1, num_shared_experts=1))
  assert "shared" in model.layers[0].mlp.params()
  np.testing.assert_allclose(nnx.capture(model, moejax.flax.AuxLoss)(tokens)[0], dense_BTV, atol=1e-5)


def test_upcycle_bad_input_one_line_errors_name_the_path():
  def err(fn):
    with pytest.raises(ValueError) as e:
      fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg

  m_cfg = config.MoEConfig(num_experts=E, top_k=2)
  msg = err(lambda: moejax.flax.upcycle(NNXLM(nnx.Rngs(0)), select=r"blocks/\d+/ffn", moe=m_cfg))
  assert "matches no module" in msg and "'layers/0/mlp'" in msg
  msg = err(lambda: moejax.flax.upcycle(NNXLM(nnx.Rngs(0)), select=r"layers/\d+/attn", moe=m_cfg))
  assert "'layers/0/attn'" in msg and "cannot map" in msg and "[8, 2, 4]" in msg
  msg = err(lambda: moejax.flax.upcycle(NNXLM(nnx.Rngs(0)), select=r"layers/\d+/mlp",
                                        moe={"num_experts": 2, "top_k": 4}))
  assert "layers/0/mlp" in msg and "top_k=4" in msg
  bad = moejax.flax.MLPLayout(gate="up_proj", up="gate_proj", down="up_proj")
  msg = err(lambda: moejax.flax.upcycle(NNXLM(nnx.Rngs(0)), select=r"layers/0/mlp", moe=m_cfg, mlp=bad))
  assert "layers/0/mlp" in msg and "down_proj/kernel [16, 8]" in msg  # a param the layout leaves unread
  odd = {"mlp": {"Dense_0": {"kernel": jnp.zeros((8, 16))}, "Dense_1": {"kernel": jnp.zeros((12, 8))}}}
  msg = err(lambda: moejax.flax.upcycle(odd, select="mlp", moe=m_cfg))
  assert "mlp/Dense_1/kernel is [12, 8]" in msg and "[16, 8]" in msg
  gelu_exact = moejax.flax.MLPLayout(up="Dense_0", down="Dense_1", activation="gelu")
  params = LinenLM().init(jax.random.key(0), _tokens())["params"]
  moejax.flax.upcycle(params, select="block_0/mlp", moe=m_cfg, mlp=gelu_exact)  # Linen: no module to check
  msg = err(lambda: moejax.flax.upcycle(params, select="block_0/mlpx", moe=m_cfg))
  assert "'block_0/mlp'" in msg


class LinenNested(nn.Module):
  """`nn.Dense(d)(gelu(nn.Dense(f)(x)))`: the outer Dense is created first, so Dense_0 is *down*."""

  d_ff: int

  @nn.compact
  def __call__(self, x):
    return nn.Dense(x.shape[-1])(nn.gelu(nn.Dense(self.d_ff)(x)))


class LinenHolder(nn.Module):
  mlp_cls: type = LinenNested
  d_ff: int = D

  @nn.compact
  def __call__(self, x):
    return x + self.mlp_cls(self.d_ff, name="mlp")(nn.LayerNorm()(x))


def test_linen_up_down_swapped_is_caught_at_upcycling():
  """d_model == d_ff: the built-in `linen_gelu` layout reads Dense_0 as up, which this MLP made down; the
  shapes fit either way, so only running the dense module can tell. Without it, upcycling refuses (check=False
  takes the user's word for the layout)."""
  x_BTD = jax.random.normal(jax.random.key(3), (2, 5, D))
  m_cfg = config.MoEConfig(num_experts=E, top_k=2)
  swapped = LinenHolder(LinenNested, d_ff=D)
  params = swapped.init(jax.random.key(0), x_BTD)["params"]
  with pytest.raises(moejax.flax.FlaxUpcycleError, match="'mlp' differs"):
    moejax.flax.upcycle(params, select="mlp", moe=m_cfg, module=swapped, inputs=(x_BTD,))
  with pytest.raises(moejax.flax.FlaxUpcycleError, match="cannot be told from the params"):
    moejax.flax.upcycle({"params": params}, select="mlp", moe=m_cfg)
  moejax.flax.upcycle({"params": params}, select="mlp", moe=m_cfg, check=False)  # the user's word for it
  up_down = moejax.flax.MLPLayout(up="Dense_1", down="Dense_0", activation="gelu_tanh")
  out = moejax.flax.upcycle({"params": params}, select="mlp", moe=m_cfg, mlp=up_down, module=swapped,
                            inputs=x_BTD)["params"]  # the right mapping passes the same check
  moe_model = LinenHolder(lambda f, name: moejax.flax.linen.MoE(f, m_cfg, activation="gelu_tanh", bias=True,
                                                                name=name))
  np.testing.assert_allclose(moe_model.apply({"params": out}, x_BTD),
                             swapped.apply({"params": params}, x_BTD), atol=1e-5)
  wide = LinenHolder(LinenNested, d_ff=F)  # D != F: the swap shows in the widths the MLP is called with
  wide_params = wide.init(jax.random.key(0), x_BTD)["params"]
  with pytest.raises(moejax.flax.FlaxUpcycleError, match="takes inputs of width 8"):
    moejax.flax.upcycle(wide_params, select="mlp", moe=m_cfg, module=wide, inputs=(x_BTD,))
  in_order = LinenHolder(LinenMlp, d_ff=D)  # big_vision's order: Dense_0 is up, square kernels, checked quietly
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    moejax.flax.upcycle(in_order.init(jax.random.key(0), x_BTD), select="mlp", moe=m_cfg, module=in_order,
                        inputs=(x_BTD,))


def test_wrong_activation_is_caught_at_upcycling():
  class GeluMlp(nnx.Module):
    def __init__(self, rngs):
      self.fc1, self.fc2 = nnx.Linear(D, F, rngs=rngs), nnx.Linear(F, D, rngs=rngs)

    def __call__(self, x):
      return self.fc2(nnx.gelu(self.fc1(x)))  # tanh-approximate gelu (flax's default)

  class Net(nnx.Module):
    def __init__(self, rngs):
      self.mlp = GeluMlp(rngs)

  with pytest.raises(moejax.flax.FlaxUpcycleError, match="'mlp' differs"):
    moejax.flax.upcycle(Net(nnx.Rngs(0)), select="mlp", moe=config.MoEConfig(num_experts=E, top_k=2),
                        mlp=moejax.flax.MLPLayout(up="fc1", down="fc2", activation="gelu"))
  mesh = sharding.make_mesh(config.MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
  with jax.set_mesh(mesh):  # upcycled under a mesh: the new params are placed by moejax's rules
    net = moejax.flax.upcycle(Net(nnx.Rngs(0)), select="mlp", moe=config.MoEConfig(num_experts=E, top_k=2))
  assert net.mlp.cfg.activation == "gelu_tanh" and net.mlp.cfg.bias  # fc_gelu picked by its names
  w = net.mlp.experts["w_up"][...]
  assert w.sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", "tensor") and w.sharding.mesh == mesh

# ----------------------------------------------------------------------------------------------------------
# moejax's own decoder, both ways
# ----------------------------------------------------------------------------------------------------------


def test_moejax_transformer_state_both_ways(tmp_path):
  cfg = config.ModelConfig(vocab_size=32, d_model=D, num_layers=2, num_heads=2, d_ff=F,
                           moe=config.MoEConfig(num_experts=E, top_k=2))
  specs = transformer.specs(cfg)
  params = sharding.init_params(jax.random.key(0), specs)
  tokens = _tokens()
  want_BTV, aux = transformer.forward(params, tokens, cfg)

  model = moejax.flax.Transformer.from_params(params, cfg)
  got_BTV, got_aux = nnx.capture(model, moejax.flax.AuxLoss)(tokens)
  np.testing.assert_allclose(got_BTV, want_BTV, atol=1e-6)
  np.testing.assert_allclose(moejax.flax.sum_named(got_aux), aux["aux_loss"], atol=1e-7)
  back = model.params()
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  model.load_params(jax.tree.map(lambda a: a + 1.0, params))
  np.testing.assert_array_equal(model.params()["layers"]["1"]["moe"]["router"]["w"],
                                params["layers"]["1"]["moe"]["router"]["w"] + 1.0)

  lin = moejax.flax.linen.Transformer(cfg)
  variables = moejax.flax.linen.variables(params, specs)
  np.testing.assert_allclose(lin.apply(variables, tokens), want_BTV, atol=1e-6)
  init_shapes = jax.tree.map(jnp.shape, moejax.flax.linen.params(lin.init(jax.random.key(0), tokens)))
  assert init_shapes == jax.tree.map(jnp.shape, params)
  jax.tree.map(np.testing.assert_array_equal, moejax.flax.linen.params(variables), params)

  exp = config.ExperimentConfig(model=cfg)  # a moejax run's step 0 from the Flax module, and back
  moejax.flax.save_run(model, exp, tmp_path / "run")
  again = moejax.flax.load_run(tmp_path / "run")
  assert again.cfg == cfg
  jax.tree.map(np.testing.assert_array_equal, again.params(), model.params())
  with pytest.raises(FileExistsError):
    moejax.flax.save_run(model, exp, tmp_path / "run")

# ----------------------------------------------------------------------------------------------------------
# The example script
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_example_script_runs_short(capsys):
  path = pathlib.Path(__file__).resolve().parent.parent / "examples" / "flax_nnx_upcycle.py"
  spec = importlib.util.spec_from_file_location("flax_nnx_upcycle", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  out = mod.main(["--dense-steps", "2", "--moe-steps", "2", "--batch", "4", "--seq-len", "16", "--log-every", "1"])
  assert out["logits_change"] < 1e-4
  assert all(np.isfinite(out["dense_losses"] + out["moe_losses"]))
  printed = capsys.readouterr().out
  assert "blocks/1/mlp" in printed and "expert load" in printed
