"""Two-tower contrastive model (CLIP, Radford et al. 2021; SigLIP, Zhai et al. 2023): a ViT image tower, a text
tower, L2-normalized joint embeddings, a learned temperature (and bias for the sigmoid loss).

Param paths (stable: upcycling, checkpoints and the HF CLIP importer rely on them):
  vision/...                   see models/vit.py  (patch_embed, cls, pos_embed, pre_norm, layers, final_norm, proj)
  text/...                     see models/text.py (embed, pos_embed, layers, final_norm, proj)
  shared/layers/{i}/...        clip.shared_backbone only (LIMoE, Mustafa et al. 2022): one set of blocks runs both
                               modalities; vision/ and text/ then hold no `layers`
  logit_scale                  []  log of the inverse temperature, init log(1 / clip.init_temperature) (HF name)
  logit_bias                   []  clip.loss == "sigmoid" only, init clip.init_bias (SigLIP)

Each tower's blocks follow its `ModelConfig`'s dense|MoE layer pattern, so upcycling rules written for
`layers/(\\d+)/mlp/...` apply to both towers (CLIP-UP upcycles them separately, Wang et al. 2025).
MoE aux metrics come back keyed "vision/{i}" and "text/{i}" (a shared block reports once per modality).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from moejax import config, routers, sharding
from moejax.models import text, transformer, vit

# CLIP clips the learned inverse temperature at 100 so training cannot make the logits arbitrarily sharp.
MAX_LOGIT_SCALE = 100.0


def _const(value: float):
  return lambda key, shape, dtype: jnp.full(shape, value, dtype)


# What a shared backbone needs equal in both towers. Checked when the model is built, not in ClipConfig, so that
# overrides can change the towers one at a time.
SHARED_FIELDS = ("d_model", "num_layers", "num_heads", "num_kv_heads", "head_dim", "d_ff", "activation", "norm",
                 "bias", "qkv_bias", "norm_eps", "param_dtype", "moe")


def check_shared(c: config.ClipConfig) -> None:
  bad = [f"clip.vision.{f}={getattr(c.vision, f)!r} != clip.text.{f}={getattr(c.text, f)!r}"
         for f in SHARED_FIELDS if getattr(c.vision, f) != getattr(c.text, f)]
  if bad:
    raise config.ConfigError("clip.shared_backbone=True runs both modalities through one set of blocks, so the "
                             "towers' block configs must agree: " + "; ".join(bad))


def specs(cfg: config.ExperimentConfig) -> dict:
  c = cfg.clip
  shared = c.shared_backbone
  if shared:
    check_shared(c)
  p: dict[str, Any] = {
    "vision": vit.specs(c, with_layers=not shared),
    "text": text.specs(c, with_layers=not shared),
    "logit_scale": sharding.param(_const(math.log(1.0 / c.init_temperature)), (), ()),
  }
  if shared:
    p["shared"] = {"layers": {str(i): transformer.block_specs(c.vision, i) for i in range(c.vision.num_layers)}}
  if c.loss == "sigmoid":
    p["logit_bias"] = sharding.param(_const(c.init_bias), (), ())
  return p


def _normalize(x_BJ: jax.Array) -> jax.Array:
  return x_BJ * jax.lax.rsqrt(jnp.sum(x_BJ * x_BJ, axis=-1, keepdims=True) + 1e-12)


def _aux(moe_aux: dict, prefix: str) -> dict:
  by_layer = {f"{prefix}/{i}": a for i, a in moe_aux.items()}
  return {"aux_loss": transformer.total_aux_loss(by_layer), "moe": by_layer}


def encode_image(params: dict, images_BHWC: jax.Array, cfg: config.ExperimentConfig, *,
                 rng: jax.Array | None = None, train: bool = False) -> tuple[jax.Array, dict]:
  """images [B, H, W, C] -> (unit-norm embeddings [B, J] float32, {"aux_loss", "moe": {"vision/i": aux}})."""
  c = cfg.clip
  shared = params["shared"]["layers"] if c.shared_backbone else None
  feats_BJ, moe_aux = vit.apply(params["vision"], images_BHWC, c, rng=rng, train=train, layers=shared,
                                block_cfg=c.vision)
  return _normalize(feats_BJ), _aux(moe_aux, "vision")


def encode_text(params: dict, tokens_BT: jax.Array, cfg: config.ExperimentConfig, *,
                rng: jax.Array | None = None, train: bool = False) -> tuple[jax.Array, dict]:
  """tokens [B, T] -> (unit-norm embeddings [B, J] float32, {"aux_loss", "moe": {"text/i": aux}})."""
  c = cfg.clip
  shared = params["shared"]["layers"] if c.shared_backbone else None
  # A shared backbone's blocks were declared with the vision tower's config (their shapes are checked equal).
  feats_BJ, moe_aux = text.apply(params["text"], tokens_BT, c, rng=rng, train=train, layers=shared,
                                 block_cfg=c.vision if c.shared_backbone else c.text)
  return _normalize(feats_BJ), _aux(moe_aux, "text")


def logit_scale(params: dict) -> jax.Array:
  """exp(logit_scale), clipped at 100 as in CLIP."""
  return jnp.minimum(jnp.exp(params["logit_scale"].astype(jnp.float32)), MAX_LOGIT_SCALE)


def logits(params: dict, img_BJ: jax.Array, txt_CJ: jax.Array) -> jax.Array:
  """[B, C] image-text logits: scale * cosine similarity (+ bias for SigLIP)."""
  out_BC = logit_scale(params) * jnp.einsum("BJ,CJ->BC", img_BJ, txt_CJ)
  if "logit_bias" in params:
    out_BC = out_BC + params["logit_bias"].astype(jnp.float32)
  return out_BC


# ----------------------------------------------------------------------------------------------------------
# Size and cost
# ----------------------------------------------------------------------------------------------------------


def _active_size(path: str, shape: tuple[int, ...], moe_cfg: config.MoEConfig, seq_len: int | None = None,
                 slots: bool = False) -> float:
  n = float(np.prod(shape)) if shape else 1.0
  if "/moe/experts/" in path and moe_cfg.num_experts:
    n *= routers.experts_per_token(moe_cfg, seq_len, slots) / moe_cfg.num_experts
  return n


def num_params(cfg: config.ExperimentConfig, active: bool = False) -> int:
  """Total params, or params active per token when `active` (top-k of E experts; expert choice: its capacity)."""
  total = 0.0
  for path, s in sharding.flatten(specs(cfg), is_leaf=sharding.is_spec).items():
    moe_cfg = cfg.clip.text.moe if path.startswith("text/") else cfg.clip.vision.moe
    n_tok = cfg.clip.text.max_seq_len if path.startswith("text/") else vit.num_tokens(cfg.clip)
    total += _active_size(path, s.shape, moe_cfg, n_tok) if active else float(np.prod(s.shape) if s.shape else 1)
  return int(round(total))


def _block_flops_per_token(cfg: config.ExperimentConfig, tower: str, slots: bool = False) -> float:
  """6 x active matmul weights (`w*` leaves) of the blocks: fwd + bwd, the PaLM appendix-B estimate."""
  c = cfg.clip
  t = getattr(c, tower)
  layers = specs(cfg)["shared" if c.shared_backbone else tower]["layers"]
  flat = sharding.flatten(layers, is_leaf=sharding.is_spec)
  n_tok = c.text.max_seq_len if tower == "text" else vit.num_tokens(c)
  return 6.0 * sum(_active_size(p, s.shape, t.moe, n_tok, slots) for p, s in flat.items()
                   if p.rsplit("/", 1)[-1].startswith("w"))


def flops_per_example(cfg: config.ExperimentConfig, slots: bool = False) -> float:
  """Training FLOPs per image-text pair (fwd + bwd): both towers' active matmul params x their token counts,
  attention scores, the patch embedding and projections, and the pair's row of the global similarity matrix.
  `slots`: capacity dispatch counts its whole expert buffer (routers.experts_per_token), not the routed top_k."""
  c = cfg.clip
  v, t = c.vision, c.text
  n_img, n_txt = vit.num_tokens(c), t.max_seq_len
  P2C = c.patch_size ** 2 * c.channels
  vis = n_img * _block_flops_per_token(cfg, "vision", slots) + 6.0 * vit.num_patches(c) * P2C * v.d_model
  vis += 12.0 * v.num_layers * v.num_heads * v.dim_per_head * n_img * n_img  # QK^T and AV, bidirectional
  txt = n_txt * _block_flops_per_token(cfg, "text", slots)
  txt += 12.0 * t.num_layers * t.num_heads * t.dim_per_head * n_txt * n_txt / (2 if c.text_causal else 1)
  heads = 6.0 * (v.d_model + t.d_model) * c.embed_dim
  sim = 6.0 * cfg.data.batch_size * c.embed_dim  # one row of the [B, B] logits per example
  return float(vis + txt + heads + sim)
