"""Multi-head attention with grouped-query heads and rotary embeddings.

Params: `wq` [D, H, K], `wk`/`wv` [D, G, K] (G = kv heads), `wo` [H, K, D]. RoPE uses the split-halves
("rotate_half") layout that Llama-family checkpoints use, so imported weights need no permutation; its
frequencies may be scaled for long context (`config.RopeScalingConfig`: linear, Llama 3.1's rule).
Attention itself is `jax.nn.dot_product_attention` (XLA on CPU/TPU, cuDNN flash attention on GPU when asked).
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
          mask_BT: jax.Array | None = None) -> jax.Array:
  """`mask_BT` (True = real token) masks padded keys, for the text tower; causal LMs pass None."""
  q_BTHK, k_BTGK, v_BTGK = project(p, x_BTD, rope_theta=rope_theta, rope_scaling=rope_scaling,
                                   positions_BT=positions_BT)
  q_BTHK = sharding.constrain(q_BTHK, ("batch", "seq", "act_heads", None))
  mask = None if mask_BT is None else mask_BT[:, None, None, :]  # [B, 1, 1, T] over keys
  o_BTHK = jax.nn.dot_product_attention(q_BTHK, k_BTGK, v_BTGK, mask=mask, is_causal=causal)
  return output(p, o_BTHK)
