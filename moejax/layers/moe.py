"""PLACEHOLDER (being replaced by the real MoE layer): the contract the rest of moejax relies on.

specs(cfg: ModelConfig) -> {"router": {"w": [D, E]}, "experts": {"w_gate": [E, D, F], "w_up": [E, D, F],
                                                                 "w_down": [E, F, D]}}
apply(p, x_BTD, cfg, *, rng, train) -> (y_BTD, aux) with aux keys:
  aux_loss (weighted sum, added to the training loss), load_balance_loss, z_loss,
  expert_load [E] (fraction of routed assignments per expert), dropped_fraction, router_entropy
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from moejax import config, sharding
from moejax.layers import mlp


def specs(cfg: config.ModelConfig) -> dict:
  from moejax.models.transformer import DTYPES

  pd = DTYPES[cfg.param_dtype]
  D, F, E = cfg.d_model, cfg.expert_d_ff, cfg.moe.num_experts
  experts = {
    "w_up": sharding.param(sharding.fan_in(D), (E, D, F), ("expert", "embed", "mlp"), pd),
    "w_down": sharding.param(sharding.fan_in(F), (E, F, D), ("expert", "mlp", "embed"), pd),
  }
  if cfg.activation == "swiglu":
    experts["w_gate"] = sharding.param(sharding.fan_in(D), (E, D, F), ("expert", "embed", "mlp"), pd)
  return {"router": {"w": sharding.param(sharding.normal(cfg.moe.router_init_std), (D, E), ("embed", None))},
          "experts": experts}


def apply(p: dict, x_BTD: jax.Array, cfg: config.ModelConfig, *, rng=None, train=False):
  m = cfg.moe
  E, k = m.num_experts, m.top_k
  logits_BTE = jnp.einsum("BTD,DE->BTE", x_BTD.astype(jnp.float32), p["router"]["w"].astype(jnp.float32))
  probs = jax.nn.softmax(logits_BTE, -1)
  w_BTk, idx_BTk = jax.lax.top_k(probs, k)
  if m.renormalize:
    w_BTk = w_BTk / jnp.sum(w_BTk, -1, keepdims=True)
  gates_BTE = jnp.sum(jax.nn.one_hot(idx_BTk, E) * w_BTk[..., None], -2)
  ex = p["experts"]
  dt = x_BTD.dtype
  h_up = jnp.einsum("BTD,EDF->BTEF", x_BTD, ex["w_up"].astype(dt))
  h_gate = jnp.einsum("BTD,EDF->BTEF", x_BTD, ex["w_gate"].astype(dt)) if "w_gate" in ex else None
  y_BTED = jnp.einsum("BTEF,EFD->BTED", mlp.hidden(h_gate, h_up, cfg.activation), ex["w_down"].astype(dt))
  y = jnp.einsum("BTED,BTE->BTD", y_BTED, gates_BTE.astype(dt))
  load_E = jnp.mean(jnp.sum(jax.nn.one_hot(idx_BTk, E), -2), (0, 1)) / k
  lb = E * jnp.sum(load_E * jnp.mean(probs, (0, 1)))
  z = jnp.mean(jax.nn.logsumexp(logits_BTE, -1) ** 2)
  ent = jnp.mean(-jnp.sum(probs * jnp.log(probs + 1e-9), -1))
  aux = {"aux_loss": m.load_balance_weight * lb + m.z_loss_weight * z, "load_balance_loss": lb, "z_loss": z,
         "expert_load": load_E, "dropped_fraction": jnp.zeros(()), "router_entropy": ent}
  return y, aux
