"""Token embedding and the (tied or untied) output projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax import sharding


def specs(vocab: int, d_model: int, dtype=jnp.float32) -> dict:
  return {"tokens": sharding.param(sharding.fan_in(d_model), (vocab, d_model), ("vocab", "embed"), dtype)}


def lookup(p: dict, tokens_BT: jax.Array, dtype) -> jax.Array:
  return jnp.take(p["tokens"], tokens_BT, axis=0).astype(dtype)


def attend(p: dict, x_BTD: jax.Array) -> jax.Array:
  """Tied output: logits against the embedding table (unscaled, as Llama-family checkpoints expect)."""
  # Accumulated and returned in float32: bf16 logits would round before the loss's logsumexp (moejax/precision.py).
  return jnp.einsum("BTD,VD->BTV", x_BTD, p["tokens"].astype(x_BTD.dtype), preferred_element_type=jnp.float32)
