"""Routers: token-choice top-k and expert-choice, their aux losses and metrics. All router math is float32.

Tokens come in groups `[G, S, ...]` (one group = one sequence). Expert-choice selection and capacity limits act
within a group, so the result does not depend on how the batch is split across devices.

- Token choice (Shazeer et al. 2017; Switch, Fedus et al. 2021; Mixtral): softmax over experts, then top-k.
  `renormalize` rescales the k weights to sum to 1 (Mixtral); Switch / V-MoE keep the raw probabilities.
  An optional selection bias (aux-loss-free balancing, DeepSeek-V3, Wang et al. 2024) shifts which experts
  are *picked* without changing the combine weights.
- Expert choice (Zhou et al. 2022; the encoder routing of Sparse Upcycling, Komatsuzaki et al. 2023): each
  expert picks its `ceil(capacity_factor * S / E)` highest-probability tokens of the group. `top_k` is unused;
  `capacity_factor` is the average number of experts per token.

Aux losses (weighted in config, added to the training loss by the decoder):
- load balance (Switch eq. 4): `E * sum_e f_e * P_e`, f_e the fraction of routed assignments that went to
  expert e and P_e its mean router probability; exactly 1.0 at uniform routing.
- router z-loss (ST-MoE, Zoph et al. 2022): `mean(logsumexp(logits)^2)`, keeps logits small.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from moejax import config


class TokenChoice(NamedTuple):
  expert_GSK: jax.Array  # int32 [G, S, K] chosen experts, best first
  weight_GSK: jax.Array  # float32 [G, S, K] combine weights


class ExpertChoice(NamedTuple):
  token_GEC: jax.Array  # int32 [G, E, C] token (index within the group) each expert picked
  weight_GEC: jax.Array  # float32 [G, E, C] their router probabilities (the combine weights)


def jitter_noise(rng: jax.Array, shape: tuple[int, ...], jitter: float) -> jax.Array:
  """U(1 - eps, 1 + eps) multipliers for the router input (Switch, sec. 2.4)."""
  return jax.random.uniform(rng, shape, jnp.float32, 1.0 - jitter, 1.0 + jitter)


def logits(w_DE: jax.Array, x_GSD: jax.Array, *, jitter: float = 0.0, rng: jax.Array | None = None,
           noise_GSD: jax.Array | None = None) -> jax.Array:
  """Router logits in float32. Jitter multiplies the router input by U(1 - eps, 1 + eps) (Switch, sec. 2.4):
  drawn here from `rng`, or given as `noise_GSD` (the MoE layer draws it on the global batch, so that every
  mesh layout routes with the same draw)."""
  x = x_GSD.astype(jnp.float32)
  if noise_GSD is not None:
    x = x * noise_GSD
  elif jitter > 0 and rng is not None:
    x = x * jitter_noise(rng, x.shape, jitter)
  return jnp.einsum("GSD,DE->GSE", x, w_DE.astype(jnp.float32))


def token_choice(probs_GSE: jax.Array, k: int, renormalize: bool, bias_E: jax.Array | None = None) -> TokenChoice:
  E = probs_GSE.shape[-1]
  if not 1 <= k <= E:
    raise ValueError(f"top_k={k} must be in [1, num_experts={E}]")
  scores = probs_GSE if bias_E is None else probs_GSE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
  _, expert_GSK = jax.lax.top_k(scores, k)
  weight_GSK = jnp.take_along_axis(probs_GSE, expert_GSK, axis=-1)
  if renormalize:
    weight_GSK = weight_GSK / jnp.sum(weight_GSK, -1, keepdims=True)
  return TokenChoice(expert_GSK.astype(jnp.int32), weight_GSK)


def expert_capacity(capacity_factor: float, group_size: int, num_experts: int, k: int = 1) -> int:
  """Slots per expert per group: ceil(capacity_factor * k * S / E), within [1, S] (an expert sees a token once)."""
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
  return max(1, min(group_size, math.ceil(capacity_factor * k * group_size / num_experts)))


def expert_choice(probs_GSE: jax.Array, capacity: int) -> ExpertChoice:
  weight_GEC, token_GEC = jax.lax.top_k(jnp.swapaxes(probs_GSE, 1, 2), capacity)
  return ExpertChoice(token_GEC.astype(jnp.int32), weight_GEC)


def assignment_fraction(routing: TokenChoice | ExpertChoice, num_experts: int) -> jax.Array:
  """f_e: fraction of routed (token, expert) assignments per expert, before any capacity drop. Sums to 1."""
  if isinstance(routing, ExpertChoice):
    return jnp.full((num_experts,), 1.0 / num_experts, jnp.float32)
  counts_E = jnp.sum(jax.nn.one_hot(routing.expert_GSK, num_experts, dtype=jnp.float32), (0, 1, 2))
  return counts_E / routing.expert_GSK.size


def stats(logits_GSE: jax.Array, probs_GSE: jax.Array, routing: TokenChoice | ExpertChoice) -> dict:
  """Per-shard means that combine across devices by averaging (equal shard sizes); see `aux_from_stats`."""
  E = logits_GSE.shape[-1]
  return {
    "load": assignment_fraction(routing, E),
    "prob": jnp.mean(probs_GSE, (0, 1)),
    "z": jnp.mean(jax.nn.logsumexp(logits_GSE, -1) ** 2),
    "entropy": jnp.mean(-jnp.sum(probs_GSE * jnp.log(jnp.maximum(probs_GSE, 1e-30)), -1)),
  }


def aux_from_stats(st: dict, dropped_fraction: jax.Array, moe: config.MoEConfig) -> dict:
  """The aux dict of the MoE contract, from (globally averaged) router stats."""
  E = st["load"].shape[0]
  # f_e is a count (no gradient); the gradient reaches the router through P_e, as in Switch.
  lb = E * jnp.sum(jax.lax.stop_gradient(st["load"]) * st["prob"])
  z = st["z"]
  return {
    "aux_loss": (moe.load_balance_weight * lb + moe.z_loss_weight * z).astype(jnp.float32),
    "load_balance_loss": lb.astype(jnp.float32),
    "z_loss": z.astype(jnp.float32),
    "expert_load": jax.lax.stop_gradient(st["load"]).astype(jnp.float32),
    "dropped_fraction": jax.lax.stop_gradient(dropped_fraction).astype(jnp.float32),
    "router_entropy": jax.lax.stop_gradient(st["entropy"]).astype(jnp.float32),
  }
