"""Text transformer tower as CLIP uses it: token + learned position embeddings, causal pre-LN blocks, pooling at
the end-of-text token, a linear projection.

Param paths, under `text/` in the two-tower model (see two_tower.py):
  embed/tokens                 [V, D]       (HF `token_embedding`)
  pos_embed                    [T, D]       T = clip.text.max_seq_len, learned (no RoPE) (HF `position_embedding`)
  layers/{i}/...               the decoder's block layout (transformer.block_specs)
  final_norm/{scale,bias}      [D]          (HF `final_layer_norm`)
  proj/w                       [D, J]       no bias (HF `text_projection`)

Captions are encoded as `tokens + [EOS]` and padded with EOS (`clip.eos_id`). Pooling:
  "eos"     the first EOS position (what HF's CLIP does when `eos_token_id` is set);
  "argmax"  the highest id (OpenAI CLIP: its end-of-text id is the largest in the vocab).
Keys after the pooled position are masked as padding; with the (default) causal mask they could not reach the
pooled token anyway, so the attention mask matters only for `clip.text_causal=False`. MoE layers route with the
same mask: padding takes no capacity and stays out of the router statistics and bias balancing. Routing is
not causal here (top-1-priority capacity, expert choice allowed): only the pooled token is read out, and it
sees every real token anyway.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax import config, sharding
from moejax.layers import embed
from moejax.models import transformer


def specs(cfg: config.ClipConfig, *, with_layers: bool = True) -> dict:
  """The text tower's params; `with_layers=False` when a shared backbone holds the blocks."""
  t = cfg.text
  pd = transformer.DTYPES[t.param_dtype]
  p: dict = {
    "embed": embed.specs(t.vocab_size, t.d_model, pd),
    "pos_embed": sharding.param(sharding.normal(0.01), (t.max_seq_len, t.d_model), (None, "embed"), pd),
  }
  if with_layers:
    p["layers"] = {str(i): transformer.block_specs(t, i) for i in range(t.num_layers)}
  p["final_norm"] = transformer.norm_specs(t)
  p["proj"] = {"w": sharding.param(sharding.fan_in(t.d_model), (t.d_model, cfg.embed_dim), ("embed", None), pd)}
  return p


def pool_index(tokens_BT: jax.Array, cfg: config.ClipConfig) -> jax.Array:
  """[B] position each caption is pooled at (the last position when a caption has no EOS at all)."""
  T = tokens_BT.shape[1]
  if cfg.text_pool == "argmax":
    return jnp.argmax(tokens_BT, axis=-1)
  is_eos_BT = tokens_BT == cfg.eos_id
  return jnp.where(jnp.any(is_eos_BT, -1), jnp.argmax(is_eos_BT, -1), T - 1)


def apply(p: dict, tokens_BT: jax.Array, cfg: config.ClipConfig, *, rng: jax.Array | None, train: bool,
          layers: dict | None = None, block_cfg: config.ModelConfig | None = None) -> tuple[jax.Array, dict]:
  """tokens [B, T] int -> (features [B, J] float32, per-layer MoE aux by layer index)."""
  t = cfg.text
  block_cfg = block_cfg or t
  layers = p["layers"] if layers is None else layers
  B, T = tokens_BT.shape
  if T > t.max_seq_len:
    raise ValueError(f"captions of {T} tokens exceed clip.text.max_seq_len={t.max_seq_len}")
  cd = transformer.DTYPES[t.compute_dtype]
  x_BTD = embed.lookup(p["embed"], tokens_BT, cd) + p["pos_embed"][:T].astype(cd)[None]
  x_BTD = sharding.constrain(x_BTD, ("batch", "seq", "act_embed"))
  idx_B = pool_index(tokens_BT, cfg)
  mask_BT = jnp.arange(T)[None, :] <= idx_B[:, None]  # real tokens and the pooled EOS; later ones are padding
  x_BTD, moe_aux = transformer.run_blocks(layers, x_BTD, block_cfg, rng=rng, train=train, causal=cfg.text_causal,
                                          causal_routing=False,
                                          use_rope=False, mask_BT=mask_BT)
  x_BTD = transformer.norm_apply(t, p["final_norm"], x_BTD)
  pooled_BD = jnp.take_along_axis(x_BTD, idx_B[:, None, None], axis=1)[:, 0]
  feats_BJ = jnp.einsum("BD,DJ->BJ", pooled_BD, p["proj"]["w"].astype(cd))
  return feats_BJ.astype(jnp.float32), moe_aux
