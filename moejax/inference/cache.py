"""The static KV cache: per layer `k`, `v` of shape `[B, S, G, K]` (G kv heads, so GQA stores G, not H).

Slot s of sequence b holds the key/value of that sequence's token at position s (positions are per sequence:
prompts are right-padded, so a ragged batch needs no position offsets). Slots past a sequence's length hold
stale values that the decoder masks out and overwrites before it ever attends to them.
Sharded over `batch` (the data-parallel axes) and over the kv-head axis where `tensor` > 1.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

from moejax import config, sharding
from moejax.layers import attention

AXES = attention.CACHE_AXES  # [B, S, G, K]


def shape(cfg: config.ModelConfig, batch: int, max_len: int) -> tuple[int, int, int, int]:
  return (batch, max_len, cfg.kv_heads, cfg.dim_per_head)


def init(cfg: config.ModelConfig, batch: int, max_len: int, dtype) -> dict:
  """{layer: {"k": zeros [B, S, G, K], "v": ...}}; constrained to the cache sharding when a mesh is active."""
  zeros = lambda: sharding.constrain(jnp.zeros(shape(cfg, batch, max_len), dtype), AXES)
  return {str(i): {"k": zeros(), "v": zeros()} for i in range(cfg.num_layers)}


def shardings(cfg: config.ModelConfig, batch: int, max_len: int, mesh: Mesh) -> dict:
  spec = sharding._divisible_spec(shape(cfg, batch, max_len), sharding.spec_for(AXES, mesh), mesh)
  one = NamedSharding(mesh, spec)
  return {str(i): {"k": one, "v": one} for i in range(cfg.num_layers)}


def nbytes(cfg: config.ModelConfig, batch: int, max_len: int, dtype) -> int:
  B, S, G, K = shape(cfg, batch, max_len)
  return 2 * cfg.num_layers * B * S * G * K * jnp.dtype(dtype).itemsize

