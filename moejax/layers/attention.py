"""Multi-head attention with grouped-query heads and rotary embeddings.

Params: `wq` [D, H, K], `wk`/`wv` [D, G, K] (G = kv heads), `wo` [H, K, D]. RoPE uses the split-halves
("rotate_half") layout that Llama-family checkpoints use, so imported weights need no permutation; its
frequencies may be scaled for long context (`config.RopeScalingConfig`: linear, Llama 3.1's rule).
Attention itself is `attend`: `jax.nn.dot_product_attention` (XLA on CPU/TPU, cuDNN flash attention on GPU: chosen
by `model.attention_impl=auto|xla|cudnn|einsum`) with causal, grouped-query, key-padding and document (segment)
masks; `einsum` is a plain reference the tests hold the kernels to.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax import config, sharding


def specs(d_model: int, num_heads: int, num_kv_heads: int, head_dim: int, dtype=jnp.float32,
          qkv_bias: bool = False, out_bias: bool = False) -> dict:
  """`qkv_bias` adds q/k/v biases (Qwen2, CLIP); `out_bias` the output-projection bias (CLIP)."""
  D, H, G, K = d_model, num_heads, num_kv_heads, head_dim
  p = {
    "wq": sharding.param(sharding.fan_in(D), (D, H, K), ("embed", "heads", "kv"), dtype),
    "wk": sharding.param(sharding.fan_in(D), (D, G, K), ("embed", "heads", "kv"), dtype),
    "wv": sharding.param(sharding.fan_in(D), (D, G, K), ("embed", "heads", "kv"), dtype),
    "wo": sharding.param(sharding.fan_in(H * K), (H, K, D), ("heads", "kv", "embed"), dtype),
  }
  if qkv_bias:
    p["bq"] = sharding.param(sharding.zeros, (H, K), ("heads", "kv"), dtype)
    p["bk"] = sharding.param(sharding.zeros, (G, K), ("heads", "kv"), dtype)
    p["bv"] = sharding.param(sharding.zeros, (G, K), ("heads", "kv"), dtype)
  if out_bias:
    p["bo"] = sharding.param(sharding.zeros, (D,), (None,), dtype)
  return p


def rope_inv_freq(K: int, theta: float, scaling: config.RopeScalingConfig | None = None) -> np.ndarray:
  """[K/2] float32 rotation frequencies (radians per position) of RoPE with base `theta`, after `scaling`.
  Computed in float64 numpy at trace time: a constant of the program."""
  inv_freq = 1.0 / (theta ** (np.arange(0, K, 2, dtype=np.float64) / K))
  sc = scaling or config.RopeScalingConfig()
  if sc.type == "linear":
    inv_freq = inv_freq / sc.factor
  elif sc.type == "llama3":
    wavelen = 2 * np.pi / inv_freq
    long_wavelen = sc.original_max_seq_len / sc.low_freq_factor  # above: slowed down by `factor`
    short_wavelen = sc.original_max_seq_len / sc.high_freq_factor  # below: unchanged
    smooth = (sc.original_max_seq_len / wavelen - sc.low_freq_factor) / (sc.high_freq_factor - sc.low_freq_factor)
    between = (1 - smooth) * inv_freq / sc.factor + smooth * inv_freq
    inv_freq = np.where(wavelen > long_wavelen, inv_freq / sc.factor,
                        np.where(wavelen < short_wavelen, inv_freq, between))
  return inv_freq.astype(np.float32)


def rope(x_BTHK: jax.Array, positions_BT: jax.Array, theta: float,
         scaling: config.RopeScalingConfig | None = None) -> jax.Array:
  K = x_BTHK.shape[-1]
  inv_freq_k = jnp.asarray(rope_inv_freq(K, theta, scaling))  # [K/2]
  ang_BTk = positions_BT[..., None].astype(jnp.float32) * inv_freq_k
  cos = jnp.cos(jnp.concatenate([ang_BTk, ang_BTk], -1))[:, :, None, :]
  sin = jnp.sin(jnp.concatenate([ang_BTk, ang_BTk], -1))[:, :, None, :]
  x32 = x_BTHK.astype(jnp.float32)
  x1, x2 = jnp.split(x32, 2, axis=-1)
  rotated = jnp.concatenate([-x2, x1], axis=-1)
  return (x32 * cos + rotated * sin).astype(x_BTHK.dtype)


def project(p: dict, x_BTD: jax.Array, *, rope_theta: float | None = 10000.0,
            rope_scaling: config.RopeScalingConfig | None = None,
            positions_BT: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
  """q [B, T, H, K], k and v [B, T, G, K]: the projections (+ biases) and RoPE at `positions_BT`
  (default 0..T-1). Shared by `apply` and the KV-cache decoder (`moejax/inference`)."""
  dt = x_BTD.dtype
  B, T, _ = x_BTD.shape
  q_BTHK = jnp.einsum("BTD,DHK->BTHK", x_BTD, p["wq"].astype(dt))
  k_BTGK = jnp.einsum("BTD,DGK->BTGK", x_BTD, p["wk"].astype(dt))
  v_BTGK = jnp.einsum("BTD,DGK->BTGK", x_BTD, p["wv"].astype(dt))
  if "bq" in p:
    q_BTHK += p["bq"].astype(dt)
    k_BTGK += p["bk"].astype(dt)
    v_BTGK += p["bv"].astype(dt)
  if rope_theta is not None:
    if positions_BT is None:
      positions_BT = jnp.broadcast_to(jnp.arange(T), (B, T))
    q_BTHK = rope(q_BTHK, positions_BT, rope_theta, rope_scaling)
    k_BTGK = rope(k_BTGK, positions_BT, rope_theta, rope_scaling)
  return q_BTHK, k_BTGK, v_BTGK


def output(p: dict, o_BTHK: jax.Array) -> jax.Array:
  y_BTD = jnp.einsum("BTHK,HKD->BTD", o_BTHK, p["wo"].astype(o_BTHK.dtype))
  if "bo" in p:
    y_BTD += p["bo"].astype(o_BTHK.dtype)
  return y_BTD


def apply(p: dict, x_BTD: jax.Array, *, causal: bool, rope_theta: float | None = 10000.0,
          rope_scaling: config.RopeScalingConfig | None = None, positions_BT: jax.Array | None = None,
          mask_BT: jax.Array | None = None, segment_ids_BT: jax.Array | None = None,
          impl: str = "auto") -> jax.Array:
  """`mask_BT` (True = real token) masks padded keys, for the text tower; causal LMs pass None.
  `segment_ids_BT` (packed documents) lets a token attend only within its own segment."""
  q_BTHK, k_BTGK, v_BTGK = project(p, x_BTD, rope_theta=rope_theta, rope_scaling=rope_scaling,
                                   positions_BT=positions_BT)
  q_BTHK = sharding.constrain(q_BTHK, ("batch", "seq", "act_heads", None))
  o_BTHK = attend(q_BTHK, k_BTGK, v_BTGK, causal=causal, mask_BS=mask_BT, segment_ids_BT=segment_ids_BT, impl=impl)
  return output(p, o_BTHK)


CACHE_AXES = ("batch", None, "act_heads", None)  # a layer's KV cache, k and v: [B, S, G, K]


def cache_write(buf_BSGK: jax.Array, new_BTGK: jax.Array, positions_BT: jax.Array) -> jax.Array:
  """Scatter each sequence's new rows into its own slots (a per-row position, so ragged batches work)."""
  B = buf_BSGK.shape[0]
  rows_B1 = jnp.arange(B, dtype=jnp.int32)[:, None]
  return buf_BSGK.at[rows_B1, positions_BT].set(new_BTGK.astype(buf_BSGK.dtype), mode="drop")


def apply_cached(p: dict, x_BTD: jax.Array, cache: dict, positions_BT: jax.Array, *, prefill: bool,
                 rope_theta: float | None, rope_scaling: config.RopeScalingConfig | None,
                 impl: str = "auto") -> tuple[jax.Array, dict]:
  """Causal self-attention over a KV cache (`moejax/inference`): -> (output [B, T, D], the layer's updated cache
  {"k", "v"} [B, S, G, K]). Slot s of sequence b holds its token at position s. `prefill`: a right-padded prompt
  attends to itself (causal: a real token never sees a pad) and fills slots 0..T-1; otherwise the new tokens go to
  slots `positions_BT` and attend to slots 0..position of their own sequence."""
  q_BTHK, k_BTGK, v_BTGK = project(p, x_BTD, rope_theta=rope_theta, rope_scaling=rope_scaling,
                                   positions_BT=positions_BT)
  q_BTHK = sharding.constrain(q_BTHK, ("batch", "seq", "act_heads", None))
  if prefill:
    o_BTHK = attend(q_BTHK, k_BTGK, v_BTGK, causal=True, impl=impl)
    k_all = jax.lax.dynamic_update_slice(cache["k"], k_BTGK.astype(cache["k"].dtype), (0, 0, 0, 0))
    v_all = jax.lax.dynamic_update_slice(cache["v"], v_BTGK.astype(cache["v"].dtype), (0, 0, 0, 0))
  else:
    k_all = cache_write(cache["k"], k_BTGK, positions_BT)
    v_all = cache_write(cache["v"], v_BTGK, positions_BT)
    S = k_all.shape[1]
    # Query at position t sees slots 0..t of its own sequence; later slots are stale or empty.
    mask_BTS = jnp.arange(S, dtype=jnp.int32)[None, None, :] <= positions_BT[:, :, None]
    o_BTHK = attend(q_BTHK, k_all.astype(q_BTHK.dtype), v_all.astype(q_BTHK.dtype), causal=False,
                    mask_B1TS=mask_BTS[:, None], impl=impl)
  k_all = sharding.constrain(k_all, CACHE_AXES)
  v_all = sharding.constrain(v_all, CACHE_AXES)
  return output(p, o_BTHK), {"k": k_all, "v": v_all}


# ----------------------------------------------------------------------------------------------------------
# The attention kernel, selectable (`model.attention_impl`)
# ----------------------------------------------------------------------------------------------------------

IMPLS = ("auto", "xla", "cudnn", "einsum")


def check_impl(impl: str, where: str = "model.attention_impl", platform: str | None = None) -> None:
  """Before a run starts: cuDNN's fused attention exists on NVIDIA GPUs only."""
  platform = platform or jax.default_backend()
  if impl == "cudnn" and platform != "gpu":
    raise config.ConfigError(f"{where}='cudnn' needs an NVIDIA GPU (this backend is {platform!r}); use auto "
                             f"(cuDNN on GPU where it applies, XLA elsewhere), xla or einsum")


def resolve_impl(impl: str, dtype, head_dim: int, has_mask: bool, platform: str | None = None) -> str:
  """`auto` -> cuDNN's flash attention on GPU for bf16/fp16 heads of <= 128 (a multiple of 8) with at most a
  causal mask (no padding or document mask, which cuDNN would take as a dense [B, 1, T, S] bias), else XLA."""
  if impl != "auto":
    return impl
  platform = platform or sharding.platform()
  fits = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)) and head_dim % 8 == 0 and head_dim <= 128
  return "cudnn" if platform == "gpu" and fits and not has_mask else "xla"


def attention_mask(B: int, T: int, S: int, *, mask_BS: jax.Array | None = None,
                   segment_ids_BT: jax.Array | None = None, kv_segment_ids_BS: jax.Array | None = None):
  """[B, 1, T, S] bool (True = may attend) from key padding and document segments, or None for neither.
  Causality is not in it: kernels take that as a flag."""
  mask = None
  if mask_BS is not None:
    mask = jnp.broadcast_to(mask_BS[:, None, None, :].astype(bool), (B, 1, T, S))
  if segment_ids_BT is not None:
    kv = segment_ids_BT if kv_segment_ids_BS is None else kv_segment_ids_BS
    same = (segment_ids_BT[:, :, None] == kv[:, None, :])[:, None]  # [B, 1, T, S]
    mask = same if mask is None else mask & same
  return mask


def attend(q_BTHK: jax.Array, k_BSGK: jax.Array, v_BSGK: jax.Array, *, causal: bool,
           mask_BS: jax.Array | None = None, segment_ids_BT: jax.Array | None = None,
           mask_B1TS: jax.Array | None = None, impl: str = "auto") -> jax.Array:
  """softmax(q k^T / sqrt(K)) v with grouped-query heads (H = G x heads per group), logits and softmax in float32.
  Masks: `causal` (query t sees keys <= t, aligned at the start), key padding `mask_BS`, document
  `segment_ids_BT` (self-attention), or a ready `mask_B1TS` (the KV-cache decoder's). `impl` as
  `model.attention_impl`: xla / cudnn (`jax.nn.dot_product_attention`) or einsum (the plain reference)."""
  B, T, _, K = q_BTHK.shape
  S = k_BSGK.shape[1]
  mask = attention_mask(B, T, S, mask_BS=mask_BS, segment_ids_BT=segment_ids_BT)
  if mask_B1TS is not None:
    mask = mask_B1TS if mask is None else mask & mask_B1TS
  impl = resolve_impl(impl, q_BTHK.dtype, K, mask is not None)
  if impl == "einsum":
    return _einsum_attention(q_BTHK, k_BSGK, v_BSGK, causal=causal, mask_B1TS=mask)
  if impl not in ("xla", "cudnn"):
    raise ValueError(f"attention impl {impl!r} unknown; choose one of {IMPLS}")
  return jax.nn.dot_product_attention(q_BTHK, k_BSGK, v_BSGK, mask=mask, is_causal=causal, implementation=impl)


def _einsum_attention(q_BTHK, k_BSGK, v_BSGK, *, causal: bool, mask_B1TS) -> jax.Array:
  """The reference: explicit einsums, heads grouped as [G, H/G]. A fully masked row gets the same large negative
  logits as XLA's kernel (so the same uniform average), which only padding queries ever see."""
  B, T, H, K = q_BTHK.shape
  S, G = k_BSGK.shape[1], k_BSGK.shape[2]
  q_BTGRK = q_BTHK.reshape(B, T, G, H // G, K)
  logits_BGRTS = jnp.einsum("BTGRK,BSGK->BGRTS", q_BTGRK, k_BSGK, preferred_element_type=jnp.float32)
  logits_BGRTS = logits_BGRTS / np.sqrt(K).astype(np.float32)
  keep = jnp.ones((1, 1, 1, T, S), bool)
  if causal:
    keep = keep & (jnp.arange(T)[:, None] >= jnp.arange(S)[None, :])
  if mask_B1TS is not None:
    keep = keep & mask_B1TS[:, :, None]  # [B, 1, 1, T, S]
  logits_BGRTS = jnp.where(keep, logits_BGRTS, -0.7 * float(jnp.finfo(jnp.float32).max))
  probs_BGRTS = jax.nn.softmax(logits_BGRTS, axis=-1).astype(v_BSGK.dtype)
  o_BTGRK = jnp.einsum("BGRTS,BSGK->BTGRK", probs_BGRTS, v_BSGK)
  return o_BTGRK.reshape(B, T, H, K)
