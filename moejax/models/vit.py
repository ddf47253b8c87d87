"""ViT image tower (Dosovitskiy et al. 2021) as CLIP uses it: patch embedding, pre-LN blocks, CLS or mean pooling.

Param paths, under `vision/` in the two-tower model (see two_tower.py):
  patch_embed/w                [P*P*C, D]   rows in (py, px, c) order: HF's conv weight [D, C, P, P] maps here
                                            by `w.transpose(2, 3, 1, 0).reshape(P*P*C, D)`
  patch_embed/b                [D]          (OpenAI CLIP's conv has no bias: import zeros)
  cls                          [D]          pool == "cls" only (HF `class_embedding`)
  pos_embed                    [N(+1), D]   learned absolute positions, CLS first (no RoPE)
  pre_norm/{scale,bias}        [D]          clip.pre_norm only (HF `pre_layrnorm`)
  layers/{i}/...               the decoder's block layout (transformer.block_specs): attn_norm, attn, mlp_norm,
                               mlp or moe
  final_norm/{scale,bias}      [D]          (HF `post_layernorm`, applied before pooling; LayerNorm is per
                                            token, so norm-then-pick-CLS == pick-CLS-then-norm)
  proj/w                       [D, J]       no bias (HF `visual_projection`)

Blocks attend bidirectionally; the forward returns the projected, un-normalized image features.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax import config, sharding
from moejax.models import transformer


def num_patches(cfg: config.ClipConfig) -> int:
  return (cfg.image_size // cfg.patch_size) ** 2


def num_tokens(cfg: config.ClipConfig) -> int:
  """Sequence length through the blocks: the patches, plus the CLS token when pooling at it."""
  return num_patches(cfg) + (cfg.pool == "cls")


def specs(cfg: config.ClipConfig, *, with_layers: bool = True) -> dict:
  """The vision tower's params; `with_layers=False` when a shared backbone holds the blocks."""
  t = cfg.vision
  pd = transformer.DTYPES[t.param_dtype]
  D, P, C = t.d_model, cfg.patch_size, cfg.channels
  p: dict = {
    "patch_embed": {"w": sharding.param(sharding.fan_in(P * P * C), (P * P * C, D), (None, "embed"), pd),
                    "b": sharding.param(sharding.zeros, (D,), (None,), pd)},
    "pos_embed": sharding.param(sharding.normal(0.02), (num_tokens(cfg), D), (None, "embed"), pd),
  }
  if cfg.pool == "cls":
    p["cls"] = sharding.param(sharding.normal(0.02), (D,), ("embed",), pd)
  if cfg.pre_norm:
    p["pre_norm"] = transformer.norm_specs(t)
  if with_layers:
    p["layers"] = {str(i): transformer.block_specs(t, i) for i in range(t.num_layers)}
  p["final_norm"] = transformer.norm_specs(t)
  p["proj"] = {"w": sharding.param(sharding.fan_in(D), (D, cfg.embed_dim), ("embed", None), pd)}
  return p


def patchify(images_BHWC: jax.Array, patch: int) -> jax.Array:
  """[B, H, W, C] -> [B, N, P*P*C], patches in row-major order, each flattened in (py, px, c) order."""
  B, H, W, C = images_BHWC.shape
  if H % patch or W % patch:
    raise ValueError(f"image {H}x{W} is not divisible into {patch}x{patch} patches")
  x = images_BHWC.reshape(B, H // patch, patch, W // patch, patch, C)
  x = x.transpose(0, 1, 3, 2, 4, 5)  # [B, H/P, W/P, P, P, C]
  return x.reshape(B, (H // patch) * (W // patch), patch * patch * C)


def apply(p: dict, images_BHWC: jax.Array, cfg: config.ClipConfig, *, rng: jax.Array | None, train: bool,
          layers: dict | None = None, block_cfg: config.ModelConfig | None = None) -> tuple[jax.Array, dict]:
  """images [B, H, W, C] (normalized pixels) -> (features [B, J] float32, per-layer MoE aux by layer index).

  `layers` / `block_cfg` override the tower's own blocks (the shared backbone)."""
  t = cfg.vision
  block_cfg = block_cfg or t
  layers = p["layers"] if layers is None else layers
  B, H, W, C = images_BHWC.shape
  if (H, W, C) != (cfg.image_size, cfg.image_size, cfg.channels):
    raise ValueError(f"images of shape {images_BHWC.shape}: the vision tower expects [B, {cfg.image_size}, "
                     f"{cfg.image_size}, {cfg.channels}] (clip.image_size, clip.channels)")
  cd = transformer.DTYPES[t.compute_dtype]
  patches_BNX = patchify(images_BHWC.astype(cd), cfg.patch_size)
  x_BND = jnp.einsum("BNX,XD->BND", patches_BNX, p["patch_embed"]["w"].astype(cd)) + p["patch_embed"]["b"].astype(cd)
  if cfg.pool == "cls":
    cls_B1D = jnp.broadcast_to(p["cls"].astype(cd), (B, 1, t.d_model))
    x_BND = jnp.concatenate([cls_B1D, x_BND], axis=1)
  x_BND = x_BND + p["pos_embed"].astype(cd)[None]
  if cfg.pre_norm:
    x_BND = transformer.norm_apply(t, p["pre_norm"], x_BND)
  x_BND = sharding.constrain(x_BND, ("batch", "seq", "act_embed"))
  x_BND, moe_aux = transformer.run_blocks(layers, x_BND, block_cfg, rng=rng, train=train, causal=False,
                                          use_rope=False)
  x_BND = transformer.norm_apply(t, p["final_norm"], x_BND)
  pooled_BD = x_BND[:, 0] if cfg.pool == "cls" else jnp.mean(x_BND, axis=1)
  feats_BJ = jnp.einsum("BD,DJ->BJ", pooled_BD, p["proj"]["w"].astype(cd))
  return feats_BJ.astype(jnp.float32), moe_aux
