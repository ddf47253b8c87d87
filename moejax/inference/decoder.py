"""The decoder forward with a KV cache: `prefill` (a whole right-padded prompt) and `decode` (new tokens at
per-sequence positions). Same params, same math as `models/transformer.forward`; the training path is untouched.

MoE layers run with dropless dispatch whatever the training config said: a decode step routes B tokens (often
fewer than the experts), and capacity dispatch would drop tokens depending on what else is in the batch.
Expert-choice routing cannot decode causally (an expert picks its tokens among the whole sequence, future
tokens included), so such a model is rejected with a `ConfigError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp

from moejax import config, sharding
from moejax.inference import cache as kv_cache
from moejax.layers import attention, embed, mlp, moe, router
from moejax.models import transformer


def inference_config(cfg: config.ModelConfig) -> config.ModelConfig:
  """The config the decoder runs with: MoE dispatch forced to dropless; expert-choice models rejected."""
  m = cfg.moe
  if not m.num_experts:
    return cfg
  if m.router == "expert_choice":
    raise config.ConfigError(
      "model.moe.router='expert_choice' cannot generate: each expert picks its top tokens among the whole "
      "sequence, so a token's routing depends on tokens after it (a decoder must never see the future); "
      "generate with a token_choice model (e.g. moe.router=token_choice, upcycled from the same dense run)")
  if m.dispatch != "dropless":
    cfg = dataclasses.replace(cfg, moe=dataclasses.replace(m, dispatch="dropless"))
  return cfg


@contextlib.contextmanager
def not_training():
  """Silences `moe.apply`'s advice on training a renormalized top-1 router (its gradient): generation trains
  nothing, so the advice would only mislead. Active while the model is traced."""
  with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=re.escape(moe.TOP1_RENORMALIZE_WARNING[:40]))
    yield


SMALL_STEP_ROWS = 128  # routed rows per decode step below which CPU decoding uses ragged_dot (see decode_config)


def decode_config(cfg: config.ModelConfig, tokens: int) -> config.ModelConfig:
  """The config for a decode step of `tokens` tokens. On CPU, `auto` picks the sorted grouped matmul, whose
  per-expert loops cost a fixed ~15 ms per MoE layer per step on a 2-core machine; for a few routed rows
  (< SMALL_STEP_ROWS) `ragged_dot` (on CPU a masked product over every expert: E x the FLOPs of a few rows) is
  several times faster (measured: docs/benchmarks.md). Accelerators keep `auto` (ragged_dot there anyway)."""
  m = cfg.moe
  if (m.num_experts and m.gmm_backend == "auto" and jax.default_backend() == "cpu"
      and tokens * m.top_k < SMALL_STEP_ROWS):
    return dataclasses.replace(cfg, moe=dataclasses.replace(m, gmm_backend="ragged_dot"))
  return cfg


def gathered_moe(p: dict, x_BTD: jax.Array, cfg: config.ModelConfig) -> jax.Array:
  """The MoE MLP for a few tokens (B*T*k < E): gather each assignment's expert weights and apply them as a
  batched mat-vec, so a step reads only the experts its tokens chose (the memory-bound decode regime), instead
  of a grouped matmul sized for many tokens. Same routing as `moe.apply` (router.logits -> softmax ->
  token_choice with the selection bias), same expert math (`mlp.hidden`), shared experts as there."""
  m = cfg.moe
  B, T, D = x_BTD.shape
  dt = x_BTD.dtype
  x_ND = x_BTD.reshape(B * T, D)
  logits_1NE = router.logits(p["router"]["w"], x_ND[None])
  tc = router.token_choice(router.probs(p["router"], logits_1NE), m.top_k, m.renormalize, p["router"].get("bias"))
  e_NK, w_NK = tc.expert_GSK[0], tc.weight_GSK[0]
  ex = p["experts"]

  def lin(x_NKI, name):
    y = jnp.einsum("NKI,NKIO->NKO", x_NKI, jnp.take(ex["w_" + name], e_NK, axis=0).astype(dt))
    return y + jnp.take(ex["b_" + name], e_NK, axis=0).astype(dt) if "b_" + name in ex else y

  x_NKD = jnp.broadcast_to(x_ND[:, None], (B * T, m.top_k, D))
  h_NKF = mlp.hidden(lin(x_NKD, "gate") if "w_gate" in ex else None, lin(x_NKD, "up"), cfg.activation)
  y_ND = jnp.sum(lin(h_NKF, "down") * w_NK[..., None].astype(dt), axis=1)
  y_BTD = y_ND.reshape(B, T, D)
  if "shared" in p:
    s_BTD = mlp.apply(p["shared"], x_BTD, cfg.activation)
    if "shared_gate" in p:
      s_BTD = s_BTD * jax.nn.sigmoid(jnp.einsum("BTD,DO->BTO", x_BTD, p["shared_gate"]["w"].astype(dt)))
    y_BTD = y_BTD + s_BTD
  return y_BTD


def _gather_experts(x_BTD: jax.Array, cfg: config.ModelConfig) -> bool:
  """Few routed rows and no expert-parallel mesh: read only the chosen experts."""
  B, T, _ = x_BTD.shape
  mesh = sharding.active_mesh()
  ep = mesh is not None and any(mesh.shape[a] > 1 for a in ("expert",))
  return not ep and B * T * cfg.moe.top_k < cfg.moe.num_experts


def _block(p: dict, x_BTD: jax.Array, cache_l: dict, positions_BT: jax.Array, cfg: config.ModelConfig, *,
           prefill: bool) -> tuple[jax.Array, dict]:
  h = transformer.norm_apply(cfg, p["attn_norm"], x_BTD)
  q_BTHK, k_BTGK, v_BTGK = attention.project(p["attn"], h, rope_theta=cfg.rope_theta,
                                             rope_scaling=cfg.rope_scaling, positions_BT=positions_BT)
  q_BTHK = sharding.constrain(q_BTHK, ("batch", "seq", "act_heads", None))
  if prefill:
    # The prompt attends to itself (causal): with right padding a real token never sees a pad. Its keys and
    # values fill slots 0..P-1 of the cache.
    o_BTHK = attention.attend(q_BTHK, k_BTGK, v_BTGK, causal=True, impl=cfg.attention_impl)
    k_all = jax.lax.dynamic_update_slice(cache_l["k"], k_BTGK.astype(cache_l["k"].dtype), (0, 0, 0, 0))
    v_all = jax.lax.dynamic_update_slice(cache_l["v"], v_BTGK.astype(cache_l["v"].dtype), (0, 0, 0, 0))
  else:
    k_all = kv_cache.write(cache_l["k"], k_BTGK, positions_BT)
    v_all = kv_cache.write(cache_l["v"], v_BTGK, positions_BT)
    S = k_all.shape[1]
    # Query at position t sees slots 0..t of its own sequence; later slots are stale or empty.
    mask_BTS = jnp.arange(S, dtype=jnp.int32)[None, None, :] <= positions_BT[:, :, None]
    o_BTHK = attention.attend(q_BTHK, k_all.astype(q_BTHK.dtype), v_all.astype(q_BTHK.dtype), causal=False,
                              mask_B1TS=mask_BTS[:, None], impl=cfg.attention_impl)
  k_all = sharding.constrain(k_all, kv_cache.AXES)
  v_all = sharding.constrain(v_all, kv_cache.AXES)
  x_BTD = x_BTD + attention.output(p["attn"], o_BTHK)
  x_BTD = sharding.constrain(x_BTD, ("batch", "seq", "act_embed"))
  h = transformer.norm_apply(cfg, p["mlp_norm"], x_BTD)
  if "moe" in p and not prefill and _gather_experts(h, cfg):
    y = gathered_moe(p["moe"], h, cfg)
  elif "moe" in p:
    with not_training():
      y, _ = moe.apply(p["moe"], h, cfg, rng=None, train=False)
  else:
    y = mlp.apply(p["mlp"], h, cfg.activation)
  x_BTD = sharding.constrain(x_BTD + y, ("batch", "seq", "act_embed"))
  return x_BTD, {"k": k_all, "v": v_all}


def _logits(params: dict, x_BTD: jax.Array, cfg: config.ModelConfig) -> jax.Array:
  x_BTD = transformer.norm_apply(cfg, params["final_norm"], x_BTD)
  if cfg.tie_embeddings:
    logits_BTV = embed.attend(params["embed"], x_BTD)
  else:
    logits_BTV = jnp.einsum("BTD,DV->BTV", x_BTD, params["lm_head"]["w"].astype(x_BTD.dtype))
  return sharding.constrain(logits_BTV.astype(jnp.float32), ("batch", "seq", "act_vocab"))


def _run(params: dict, tokens_BT: jax.Array, positions_BT: jax.Array, cache: dict, cfg: config.ModelConfig, *,
         prefill: bool) -> tuple[jax.Array, dict]:
  cd = transformer.DTYPES[cfg.compute_dtype]
  x_BTD = sharding.constrain(embed.lookup(params["embed"], tokens_BT, cd), ("batch", "seq", "act_embed"))
  new_cache = {}
  for i in range(cfg.num_layers):
    x_BTD, new_cache[str(i)] = _block(params["layers"][str(i)], x_BTD, cache[str(i)], positions_BT, cfg,
                                      prefill=prefill)
  return x_BTD, new_cache


def prefill(params: dict, tokens_BP: jax.Array, lengths_B: jax.Array, cache: dict,
            cfg: config.ModelConfig) -> tuple[jax.Array, dict]:
  """Right-padded prompts `[B, P]` with true lengths `[B]` -> (logits at each prompt's last token [B, V], cache
  holding slots 0..P-1). Only the B last positions go through the output projection."""
  B, P = tokens_BP.shape
  positions_BP = jnp.broadcast_to(jnp.arange(P, dtype=jnp.int32), (B, P))
  x_BPD, cache = _run(params, tokens_BP, positions_BP, cache, cfg, prefill=True)
  last_B11 = jnp.clip(lengths_B - 1, 0, P - 1).astype(jnp.int32)[:, None, None]
  x_B1D = jnp.take_along_axis(x_BPD, last_B11, axis=1)
  return _logits(params, x_B1D, cfg)[:, 0], cache


def decode(params: dict, tokens_BT: jax.Array, positions_BT: jax.Array, cache: dict,
           cfg: config.ModelConfig) -> tuple[jax.Array, dict]:
  """New tokens `[B, T]` (T = 1 in the loop) at per-sequence positions -> (logits [B, T, V], updated cache)."""
  x_BTD, cache = _run(params, tokens_BT, positions_BT.astype(jnp.int32), cache, cfg, prefill=False)
  return _logits(params, x_BTD, cfg), cache
