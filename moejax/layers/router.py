"""Routers: token-choice top-k and expert-choice, their aux losses and metrics. All router math is float32.
Which router a config uses, and what it may be used for, is the router table's (`moejax/routers.py`).

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
from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp

if TYPE_CHECKING:  # annotations only: config imports the router table, which calls into this module
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


def _softmax(logits_GSE: jax.Array) -> jax.Array:
  return jax.nn.softmax(logits_GSE, -1)


def probs(p_router: dict, logits_GSE: jax.Array, score=_softmax) -> jax.Array:
  """Router probabilities: the router's `score` (`routers.Router.score`: softmax over its experts by default),
  then, for a merged model (EEP, Liu et al. 2024), mapped onto the kept experts by `router/map` [K, E]:
  p' = p @ map^T (float32). Top-k picks over p'."""
  probs_GSE = score(logits_GSE)
  if "map" not in p_router:
    return probs_GSE
  return jnp.einsum("GSE,KE->GSK", probs_GSE, p_router["map"].astype(jnp.float32))


def _tie_rotation(n: int, m: int, shift) -> jax.Array:
  """[n, m] int32: row i lists 0..m-1 rotated left by shift(i) (a per-row permutation)."""
  return (jnp.arange(m, dtype=jnp.int32)[None, :] + jnp.asarray(shift, jnp.int32)[:, None]) % m


def token_choice(probs_GSE: jax.Array, k: int, renormalize: bool, bias_E: jax.Array | None = None) -> TokenChoice:
  """Top-k experts per token, best first. Exact ties go to experts s, s+1, ... (mod E) for the token at position
  s, not to the lowest index (what `lax.top_k` alone does): a zero-initialised router then spreads the tokens
  evenly at step 0 instead of sending all of them to experts 0..k-1. Choices between unequal scores are not
  changed, and the rule depends on the position only, so it is causal and the same under expert parallelism."""
  G, S, E = probs_GSE.shape
  if not 1 <= k <= E:
    raise ValueError(f"top_k={k} must be in [1, num_experts={E}]")
  scores = probs_GSE if bias_E is None else probs_GSE + jax.lax.stop_gradient(bias_E.astype(jnp.float32))
  rot_SE = _tie_rotation(S, E, jnp.arange(S))
  _, j_GSK = jax.lax.top_k(jnp.take_along_axis(scores, jnp.broadcast_to(rot_SE, scores.shape), -1), k)
  expert_GSK = jnp.take_along_axis(jnp.broadcast_to(rot_SE, (G, S, E)), j_GSK, -1)
  weight_GSK = jnp.take_along_axis(probs_GSE, expert_GSK, axis=-1)
  if renormalize:
    weight_GSK = weight_GSK / jnp.sum(weight_GSK, -1, keepdims=True)
  return TokenChoice(expert_GSK.astype(jnp.int32), weight_GSK)


def expert_capacity(capacity_factor: float, group_size: int, num_experts: int, k: int = 1) -> int:
  """Slots per expert per group: ceil(capacity_factor * k * S / E), within [1, S] (an expert sees a token once)."""
  if capacity_factor <= 0:
    raise ValueError(f"capacity_factor must be > 0, got {capacity_factor}")
  return max(1, min(group_size, math.ceil(capacity_factor * k * group_size / num_experts)))


def expert_choice(probs_GSE: jax.Array, capacity: int, valid_GS: jax.Array | None = None) -> ExpertChoice:
  """Each expert's `capacity` best tokens of the group. Padding (`valid_GS` False) ranks below every real token
  (the caller drops such picks); exact ties go to tokens from (e * S) // E on for expert e (see token_choice)."""
  G, S, E = probs_GSE.shape
  scores_GES = jnp.swapaxes(probs_GSE if valid_GS is None else jnp.where(valid_GS[..., None], probs_GSE, -1.0), 1, 2)
  rot_ES = _tie_rotation(E, S, jnp.arange(E) * S // E)
  _, j_GEC = jax.lax.top_k(jnp.take_along_axis(scores_GES, jnp.broadcast_to(rot_ES, scores_GES.shape), -1), capacity)
  token_GEC = jnp.take_along_axis(jnp.broadcast_to(rot_ES, (G, E, S)), j_GEC, -1)
  weight_GEC = jnp.take_along_axis(jnp.swapaxes(probs_GSE, 1, 2), token_GEC, -1)
  return ExpertChoice(token_GEC.astype(jnp.int32), weight_GEC)


def stats(logits_GSE: jax.Array, probs_GSE: jax.Array, routing: TokenChoice | ExpertChoice,
          valid_GS: jax.Array | None = None) -> dict:
  """Router statistics as sums over the real tokens (`valid_GS`; None: all), with their counts, so shards and
  padded batches combine exactly: sums and counts average across devices alike and `aux_from_stats` divides.
  Padding never reaches them. f_e counts routed (token, expert) assignments before any capacity drop.
  `probs_GSE` are the routed experts' (mapped, with a `router/map`); the z-loss reads the router's own logits."""
  E = probs_GSE.shape[-1]
  v_GS = jnp.ones(logits_GSE.shape[:2], jnp.float32) if valid_GS is None else valid_GS.astype(jnp.float32)
  n_tok = jnp.sum(v_GS)
  if isinstance(routing, ExpertChoice):  # every expert takes the same number of tokens: f_e = 1/E
    load_E = jnp.full((E,), n_tok / E, jnp.float32)
  else:
    load_E = jnp.sum(jax.nn.one_hot(routing.expert_GSK, E, dtype=jnp.float32) * v_GS[..., None, None], (0, 1, 2))
  ent_GS = -jnp.sum(probs_GSE * jnp.log(jnp.maximum(probs_GSE, 1e-30)), -1)
  return {
    "load": load_E,
    "prob": jnp.sum(probs_GSE * v_GS[..., None], (0, 1)),
    "z": jnp.sum(jax.nn.logsumexp(logits_GSE, -1) ** 2 * v_GS),
    "entropy": jnp.sum(ent_GS * v_GS),
    "tokens": n_tok,
  }


def aux_from_stats(st: dict, dropped_fraction: jax.Array, moe: config.MoEConfig) -> dict:
  """The aux dict of the MoE contract, from router stats (`stats`, summed or averaged alike over shards).

  Semantics (see docs/architecture.md, "Aux losses"): one load-balance term per MoE layer, 1.0 at uniform
  routing whatever top_k is; the decoder *sums* the layers' `aux_loss`, so `moe.load_balance_weight` is the
  weight of each layer's term. (transformers' Mixtral / Qwen2-MoE form one term over all layers' tokens
  pooled, k at balance; `interop/hf_lm.py` maps `router_aux_loss_coef` = weight * num_moe_layers / k.)"""
  E = st["load"].shape[0]
  tokens = jnp.maximum(st["tokens"], 1e-9)
  load_E = st["load"] / jnp.maximum(jnp.sum(st["load"]), 1e-9)
  prob_E = st["prob"] / tokens
  # f_e is a count (no gradient); the gradient reaches the router through P_e, as in Switch.
  lb = E * jnp.sum(jax.lax.stop_gradient(load_E) * prob_E)
  z = st["z"] / tokens
  return {
    "aux_loss": (moe.load_balance_weight * lb + moe.z_loss_weight * z).astype(jnp.float32),
    "load_balance_loss": lb.astype(jnp.float32),
    "z_loss": z.astype(jnp.float32),
    "expert_load": jax.lax.stop_gradient(load_E).astype(jnp.float32),
    "dropped_fraction": jax.lax.stop_gradient(dropped_fraction).astype(jnp.float32),
    "router_entropy": jax.lax.stop_gradient(st["entropy"] / tokens).astype(jnp.float32),
  }
