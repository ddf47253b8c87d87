"""The decoder forward with a KV cache: `prefill` (a whole right-padded prompt) and `decode` (new tokens at
per-sequence positions). Same params, same block as `models/transformer.forward`: each layer is
`transformer.block_apply` with its slice of the cache (attention over the cache, and in a decode step the MoE
layers' decode path, `moe.decode_path`).

A decode step routes B tokens, not a training batch, and the MoE layer's grouped matmuls are sized for many rows:
on CPU `ragged_dot` lowers to a masked product over every expert (E x the FLOPs) and the sorted backend pads each
expert's group to 32 rows. So on CPU (`gmm_backend=auto`) a step of up to `moe.LOOP_MAX_ROWS` routed rows takes
`moe.apply_looped`, which multiplies each expert's own rows with its weights read once (as transformers' Mixtral
block loops over the experts that got tokens); on accelerators a step of fewer routed rows than experts takes
`moe.apply_gathered` (the chosen experts' weights gathered, a batched mat-vec), and larger ones the layer itself.

MoE layers run with dropless dispatch whatever the training config said: a decode step routes B tokens (often
fewer than the experts), and capacity dispatch would drop tokens depending on what else is in the batch.
A router that is not causal (`moejax/routers.py`; expert choice: an expert picks its tokens among the whole
sequence, future tokens included) cannot decode, so such a model is rejected with a `ConfigError`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings

import jax
import jax.numpy as jnp

from moejax import config, routers, sharding
from moejax.layers import embed, moe
from moejax.models import transformer


def inference_config(cfg: config.ModelConfig) -> config.ModelConfig:
  """The config the decoder runs with: MoE dispatch forced to dropless; a router that is not causal (the router
  table's `causal`: expert choice) rejected."""
  m = cfg.moe
  if not m.num_experts:
    return cfg
  r = routers.get(m.router)
  if not r.causal:
    raise config.ConfigError(
      f"model.moe.router={m.router!r} cannot generate: {r.not_causal}, so a token's routing depends on tokens "
      f"after it (a decoder must never see the future); generate with a model of a causal router "
      f"({routers.causal_names()}), e.g. upcycled from the same dense run")
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
  with not_training():
    for i in range(cfg.num_layers):
      x_BTD, _, new_cache[str(i)] = transformer.block_apply(
        params["layers"][str(i)], x_BTD, cfg, causal=True, rng=None, train=False, cache=cache[str(i)],
        positions_BT=positions_BT, prefill=prefill)
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
