"""Attention kernels (`model.attention_impl`): XLA's `jax.nn.dot_product_attention` equals the einsum reference
(values and gradients) with causal, grouped-query, key-padding and document masks; the model and the KV-cache
decoder give the same logits under either; `auto` picks cuDNN only where it applies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moejax import config, sharding
from moejax.inference import cache as kv_cache
from moejax.inference import decoder
from moejax.layers import attention
from moejax.models import transformer

B, T, H, G, K = 2, 12, 4, 2, 8


def _qkv(seed=0, S=T):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, (B, T, H, K)), jax.random.normal(kk, (B, S, G, K)),
          jax.random.normal(kv, (B, S, G, K)))


def _segments():
  # Two packed documents in row 0 (lengths 5 and 7), one in row 1.
  return jnp.asarray([[0] * 5 + [1] * 7, [0] * T], jnp.int32)


def _padding():
  return jnp.asarray([[True] * T, [True] * 9 + [False] * 3])


MASKS = {
  "causal": dict(causal=True),
  "none": dict(causal=False),
  "causal+segments": dict(causal=True, segment_ids_BT=_segments()),
  "padding": dict(causal=False, mask_BS=_padding()),
  "causal+segments+padding": dict(causal=True, segment_ids_BT=_segments(), mask_BS=_padding()),
}


@pytest.mark.parametrize("masks", list(MASKS), ids=list(MASKS))
def test_xla_equals_einsum_values_and_grads(masks):
  kw = MASKS[masks]
  q, k, v = _qkv()
  w = jax.random.normal(jax.random.key(9), (B, T, H, K))  # a random cotangent

  def f(impl):
    return lambda q, k, v: jnp.sum(attention.attend(q, k, v, impl=impl, **kw) * w)

  out_x = attention.attend(q, k, v, impl="xla", **kw)
  out_e = attention.attend(q, k, v, impl="einsum", **kw)
  np.testing.assert_allclose(out_x, out_e, atol=1e-5, rtol=1e-5)
  gx = jax.jit(jax.grad(f("xla"), argnums=(0, 1, 2)))(q, k, v)
  ge = jax.jit(jax.grad(f("einsum"), argnums=(0, 1, 2)))(q, k, v)
  for a, b in zip(gx, ge):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_einsum_reference_is_grouped_softmax_attention():
  """The reference itself against numpy: each query head h reads kv head h // (H/G); causal + document masks."""
  q, k, v = (np.asarray(a, np.float64) for a in _qkv())
  seg = np.asarray(_segments())
  out = np.asarray(attention.attend(*map(jnp.asarray, (q, k, v)), causal=True, segment_ids_BT=_segments(),
                                    impl="einsum"))
  for b in range(B):
    for h in range(H):
      g = h // (H // G)
      s = q[b, :, h] @ k[b, :, g].T / np.sqrt(K)
      ok = np.tril(np.ones((T, T), bool)) & (seg[b][:, None] == seg[b][None, :])
      s = np.where(ok, s, -np.inf)
      p = np.exp(s - s.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      np.testing.assert_allclose(out[b, :, h], p @ v[b, :, g], atol=1e-5)


def test_document_mask_isolates_documents():
  """A token's output does not change when another document in its row changes."""
  q, k, v = _qkv()
  seg = _segments()
  k2 = k.at[0, 5:].add(1.0)  # change document 1 of row 0
  v2 = v.at[0, 5:].add(1.0)
  a = attention.attend(q, k, v, causal=True, segment_ids_BT=seg, impl="xla")
  b = attention.attend(q, k2, v2, causal=True, segment_ids_BT=seg, impl="xla")
  np.testing.assert_array_equal(a[0, :5], b[0, :5])
  assert float(jnp.abs(a[0, 5:] - b[0, 5:]).max()) > 1e-3


def _tiny(**kw):
  return config.ModelConfig(vocab_size=64, d_model=32, num_layers=1, num_heads=4, num_kv_heads=2, d_ff=64,
                            max_seq_len=32, **kw)


def test_model_logits_and_grads_equal_across_impls():
  cfg_x, cfg_e = _tiny(attention_impl="xla"), _tiny(attention_impl="einsum")
  params = sharding.init_params(jax.random.key(0), transformer.specs(cfg_x))
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 64)
  seg = _segments()

  def loss(p, cfg):
    return jnp.mean(transformer.forward(p, tokens, cfg, segment_ids_BT=seg)[0] ** 2)

  vg = jax.jit(jax.value_and_grad(loss), static_argnums=1)
  lx, gx = vg(params, cfg_x)
  le, ge = vg(params, cfg_e)
  np.testing.assert_allclose(lx, le, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(gx), jax.tree.leaves(ge)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)


def test_cached_decoder_equals_across_impls_and_full_forward():
  """Prefill + one cached decode step under einsum equal XLA's and the full forward's last logits."""
  cfg_x, cfg_e = _tiny(attention_impl="xla"), _tiny(attention_impl="einsum")
  params = sharding.init_params(jax.random.key(0), transformer.specs(cfg_x))
  tokens = jax.random.randint(jax.random.key(1), (B, T), 0, 64)
  P = T - 1
  outs = []
  for cfg in (cfg_x, cfg_e):
    icfg = decoder.inference_config(cfg)
    cache = kv_cache.init(icfg, B, 16, jnp.float32)
    _, cache = jax.jit(decoder.prefill, static_argnums=4)(params, tokens[:, :P], jnp.full((B,), P), cache, icfg)
    pos = jnp.full((B, 1), P, jnp.int32)
    logits, _ = jax.jit(decoder.decode, static_argnums=4)(params, tokens[:, P:], pos, cache, icfg)
    outs.append(logits[:, 0])
  full = jax.jit(transformer.forward, static_argnums=2)(params, tokens, cfg_x)[0][:, -1]
  np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)
  np.testing.assert_allclose(outs[1], full, atol=1e-4)


def test_auto_picks_cudnn_only_where_it_applies():
  bf16 = jnp.bfloat16
  assert attention.resolve_impl("auto", bf16, 128, has_mask=False, platform="gpu") == "cudnn"
  assert attention.resolve_impl("auto", bf16, 128, has_mask=True, platform="gpu") == "xla"  # document mask
  assert attention.resolve_impl("auto", jnp.float32, 128, has_mask=False, platform="gpu") == "xla"
  assert attention.resolve_impl("auto", bf16, 256, has_mask=False, platform="gpu") == "xla"
  assert attention.resolve_impl("auto", bf16, 128, has_mask=False, platform="cpu") == "xla"
  assert attention.resolve_impl("einsum", bf16, 128, has_mask=False, platform="gpu") == "einsum"
  with pytest.raises(config.ConfigError, match="needs an NVIDIA GPU"):
    attention.check_impl("cudnn", platform="cpu")
  attention.check_impl("cudnn", platform="gpu")
