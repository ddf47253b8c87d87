"""Decoder-only transformer LM with a per-layer dense|MoE MLP.

Param paths (stable; upcycling, checkpoints and HF interop rely on them):
  embed/tokens                       [V, D]
  layers/{i}/attn_norm/scale         [D]
  layers/{i}/attn/{wq,wk,wv,wo}      [D,H,K] [D,G,K] [D,G,K] [H,K,D]
  layers/{i}/mlp_norm/scale          [D]
  layers/{i}/mlp/{w_gate,w_up,w_down}            dense layers: [D,F] [D,F] [F,D]
  layers/{i}/moe/router/w                        MoE layers:   [D,E]
  layers/{i}/moe/experts/{w_gate,w_up,w_down}                  [E,D,F] [E,D,F] [E,F,D]
  final_norm/scale                   [D]
  lm_head/w                          [D, V]   (only when embeddings are untied)

Layers are a Python loop, not a scan: dense and MoE layers differ in structure and the per-layer paths stay
readable. Compile time grows with depth; for deep models set `model.remat=True` to bound activation memory
(`model.remat_policy` says what each block keeps: `remat_policy` below).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import ad_checkpoint

from moejax import config, routers, sharding
from moejax.layers import attention, embed, mlp, moe, norms

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def norm_specs(cfg: config.ModelConfig) -> dict:
  return norms.rms_specs(cfg.d_model) if cfg.norm == "rms" else norms.layer_specs(cfg.d_model)


def norm_apply(cfg: config.ModelConfig, p: dict, x: jax.Array) -> jax.Array:
  return norms.rms_apply(p, x, cfg.norm_eps) if cfg.norm == "rms" else norms.layer_apply(p, x, cfg.norm_eps)


def block_specs(cfg: config.ModelConfig, i: int) -> dict:
  pd = DTYPES[cfg.param_dtype]
  p = {
    "attn_norm": norm_specs(cfg),
    "attn": attention.specs(cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.dim_per_head, pd,
                            qkv_bias=cfg.qkv_bias or cfg.bias, out_bias=cfg.bias),
    "mlp_norm": norm_specs(cfg),
  }
  if cfg.moe.is_moe_layer(i):
    p["moe"] = moe.specs(cfg)
  else:
    p["mlp"] = mlp.specs(cfg.d_model, cfg.d_ff, cfg.activation, pd, bias=cfg.bias)
  return p


def block_apply(p: dict, x_BTD: jax.Array, cfg: config.ModelConfig, *, causal: bool, rng: jax.Array | None,
                train: bool, use_rope: bool = True, mask_BT: jax.Array | None = None,
                causal_routing: bool | None = None, segment_ids_BT: jax.Array | None = None,
                cache: dict | None = None, positions_BT: jax.Array | None = None, prefill: bool = False,
                tap: bool = False) -> tuple[jax.Array, dict] | tuple[jax.Array, dict, dict]:
  """One pre-norm block: the model's only one (training, the towers, the KV-cache decoder and pruning's router
  statistics all run it). Returns the new residual stream and the MoE aux dict ({} for dense layers).
  `causal_routing` (default: `causal`): route as a decoder must, each token's output independent of later
  tokens (see moe.apply). A tower read out at one pooled token that sees the whole input passes False.
  `cache` (the KV-cache decoder, `moejax/inference`): this layer's {"k", "v"} [B, S, G, K]; the tokens sit at
  `positions_BT`, `prefill` marks a whole right-padded prompt (else a decode step, whose MoE layers take the
  decode path `moe.decode_path` picks: each expert's own rows on CPU, `moe.apply_looped`, or the weights of the
  experts a few tokens chose, `moe.apply_gathered`). Then returns (x, aux, the updated cache).
  `tap`: aux also holds the MLP's input under "mlp_in" (pruning reads the router's view of each token)."""
  h = norm_apply(cfg, p["attn_norm"], x_BTD)
  if cache is None:
    a_BTD = attention.apply(p["attn"], h, causal=causal, rope_theta=cfg.rope_theta if use_rope else None,
                            rope_scaling=cfg.rope_scaling, mask_BT=mask_BT, segment_ids_BT=segment_ids_BT,
                            impl=cfg.attention_impl)
  else:
    a_BTD, cache = attention.apply_cached(p["attn"], h, cache, positions_BT, prefill=prefill,
                                          rope_theta=cfg.rope_theta if use_rope else None,
                                          rope_scaling=cfg.rope_scaling, impl=cfg.attention_impl)
  x_BTD = sharding.constrain(x_BTD + a_BTD, ("batch", "seq", "act_embed"))
  h = norm_apply(cfg, p["mlp_norm"], x_BTD)
  path = moe.decode_path(h, cfg) if "moe" in p and cache is not None and not prefill else "layer"
  if path == "looped":
    y, aux = moe.apply_looped(p["moe"], h, cfg), {}
  elif path == "gathered":
    y, aux = moe.apply_gathered(p["moe"], h, cfg), {}
  elif "moe" in p:
    routing_causal = causal if causal_routing is None else causal_routing
    y, aux = moe.apply(p["moe"], h, cfg, rng=rng, train=train, causal=routing_causal, mask_BT=mask_BT)
    y = ad_checkpoint.checkpoint_name(y, "moe_out")  # what remat_policy=save_moe keeps
  else:
    y, aux = mlp.apply(p["mlp"], h, cfg.activation), {}
  if tap:
    aux = dict(aux, mlp_in=h)
  x_BTD = sharding.constrain(x_BTD + y, ("batch", "seq", "act_embed"))
  return (x_BTD, aux) if cache is None else (x_BTD, aux, cache)


def specs(cfg: config.ModelConfig) -> dict:
  pd = DTYPES[cfg.param_dtype]
  p: dict[str, Any] = {
    "embed": embed.specs(cfg.vocab_size, cfg.d_model, pd),
    "layers": {str(i): block_specs(cfg, i) for i in range(cfg.num_layers)},
    "final_norm": norm_specs(cfg),
  }
  if not cfg.tie_embeddings:
    p["lm_head"] = {"w": sharding.param(sharding.fan_in(cfg.d_model), (cfg.d_model, cfg.vocab_size),
                                        ("embed", "vocab"), pd)}
  return p


def remat_policy(name: str):
  """`model.remat_policy` -> a `jax.checkpoint` policy: what each block saves for the backward pass (the rest is
  recomputed). full: nothing but the block's input (least memory, ~1 extra forward); dots: every matmul output;
  dots_no_batch: matmul outputs without batch dimensions (the projections, not attention's batched products);
  save_moe: the MoE layer's output, so the backward never re-runs routing, dispatch and the expert MLPs."""
  cp = jax.checkpoint_policies
  policies = {"full": cp.nothing_saveable, "dots": cp.dots_saveable,
              "dots_no_batch": cp.dots_with_no_batch_dims_saveable, "save_moe": cp.save_only_these_names("moe_out")}
  if name not in policies:
    raise config.ConfigError(f"model.remat_policy={name!r}: choose one of {sorted(policies)}")
  return policies[name]


def run_blocks(layers: dict, x_BTD: jax.Array, cfg: config.ModelConfig, *, rng: jax.Array | None, train: bool,
               **block_kw) -> tuple[jax.Array, dict]:
  """The layer loop shared by every tower: remat per block, per-layer rng, aux collected by layer index."""
  aux_all: dict[str, dict] = {}
  n = len(layers)
  for i in range(n):
    layer_rng = None if rng is None else jax.random.fold_in(rng, i)
    fn = lambda p, x, r: block_apply(p, x, cfg, rng=r, train=train, **block_kw)
    if cfg.remat:
      fn = jax.checkpoint(fn, policy=remat_policy(cfg.remat_policy))
    x_BTD, aux = fn(layers[str(i)], x_BTD, layer_rng)
    if aux:
      aux_all[str(i)] = aux
  return x_BTD, aux_all


def total_aux_loss(moe_aux: dict) -> jax.Array:
  return sum((a["aux_loss"] for a in moe_aux.values()), jnp.zeros((), jnp.float32))


def forward(params: dict, tokens_BT: jax.Array, cfg: config.ModelConfig, *, rng: jax.Array | None = None,
            train: bool = False, mask_BT: jax.Array | None = None,
            segment_ids_BT: jax.Array | None = None) -> tuple[jax.Array, dict]:
  """tokens [B, T] int -> (logits [B, T, V] float32, aux). aux = {"aux_loss": scalar, "moe": {layer: metrics}}.

  `mask_BT` (True = real token; None = all real) marks padding: padded keys are masked in attention, and padding
  is kept out of routing (no capacity slots, no router statistics). Logits at padding are meaningless.
  `segment_ids_BT` (packed documents) keeps attention within each document; positions still run 0..T-1."""
  cd = DTYPES[cfg.compute_dtype]
  x_BTD = embed.lookup(params["embed"], tokens_BT, cd)
  x_BTD = sharding.constrain(x_BTD, ("batch", "seq", "act_embed"))
  seg = {} if segment_ids_BT is None else {"segment_ids_BT": segment_ids_BT}
  x_BTD, moe_aux = run_blocks(params["layers"], x_BTD, cfg, rng=rng, train=train, causal=True, mask_BT=mask_BT,
                              **seg)
  x_BTD = norm_apply(cfg, params["final_norm"], x_BTD)
  if cfg.tie_embeddings:
    logits_BTV = embed.attend(params["embed"], x_BTD)
  else:
    logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, params["lm_head"]["w"].astype(cd), preferred_element_type=jnp.float32)
  logits_BTV = sharding.constrain(logits_BTV.astype(jnp.float32), ("batch", "seq", "act_vocab"))
  return logits_BTV, {"aux_loss": total_aux_loss(moe_aux), "moe": moe_aux}


def num_params(cfg: config.ModelConfig, active: bool = False, seq_len: int | None = None, slots: bool = False) -> int:
  """Total params, or params active per token when `active`: top_k of E experts for token choice, the expert
  choice capacity (routers.experts_per_token, at `seq_len` when given) for expert choice; `slots`: capacity
  dispatch's whole buffer instead of top_k."""
  total = 0
  for path, s in sharding.flatten(specs(cfg), is_leaf=sharding.is_spec).items():
    n = 1
    for d in s.shape:
      n *= d
    if active and "/moe/experts/" in path:
      n = int(n * routers.experts_per_token(cfg.moe, seq_len, slots) // cfg.moe.num_experts)
    total += n
  return total


def flops_per_token(cfg: config.ModelConfig, seq_len: int, slots: bool = False) -> float:
  """Training FLOPs per token: 6 x active matmul params + attention (the PaLM appendix-B estimate); `slots`:
  capacity dispatch counts its whole expert buffer, empty slots included (routers.experts_per_token)."""
  # The input lookup is free; with tied embeddings the same table is the (costly) output projection.
  n_active = num_params(cfg, active=True, seq_len=seq_len, slots=slots)
  n_active -= 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
  attn = 12 * cfg.num_layers * cfg.num_heads * cfg.dim_per_head * seq_len / 2  # causal: half the square
  return 6.0 * n_active + attn
