"""EEP candidates: per MoE layer an expert-merging matrix M [K, E] and a router-mapping matrix R [K, E].

New expert i = sum_j M[i, j] * W_j for every expert weight (w_gate, w_up, w_down and biases); the router is frozen
and its probabilities over the original E experts are mapped to the K kept ones by p' = p @ R^T, then top-k over K
and (with moe.renormalize) renormalised (Liu et al. 2024, "Efficient Expert Pruning for Sparse Mixture-of-Experts
Language Models", sec. 3). `router/map` holds R.

A candidate is `{"M": [L, K, E], "R": [L, K, E]}` (float32 numpy), L the MoE layers in `moe_layers` order.
A *selection* candidate has M == R == the same one-hot rows: it keeps experts `keep[l]` and is written as a plain
MoE (router columns and experts sliced) -- exact when moe.renormalize (the renormalised top-k weights are ratios
of probabilities, which slicing the logits does not change) and there is no router bias.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from moejax import config, routers


def moe_layers(cfg: config.ModelConfig) -> list[str]:
  """Keys of the MoE layers under params["layers"], in layer order."""
  return [str(i) for i in range(cfg.num_layers) if cfg.moe.is_moe_layer(i)]


def check_prunable(cfg: config.ModelConfig, keep: int, top_k: int) -> None:
  m = cfg.moe
  if not m.num_experts:
    raise config.ConfigError("prune needs an MoE run (model.moe.num_experts > 0); this run is dense")
  if not routers.get(m.router).token_picks:
    raise config.ConfigError(f"prune needs token-choice routing (each token picks its top-k experts); this run has "
                             f"moe.router={m.router!r}")
  if m.router_map_from:
    raise config.ConfigError("this run is already a merged (EEP) model with a router/map; prune its source run")
  if not 1 <= keep < m.num_experts:
    raise config.ConfigError(f"--keep {keep} must be in [1, {m.num_experts - 1}] (fewer than the run's "
                             f"{m.num_experts} experts)")
  if not 1 <= top_k <= keep:
    raise config.ConfigError(f"--top-k {top_k} must be in [1, --keep {keep}] (a token cannot use more experts "
                             "than are kept)")


def pruned_config(cfg: config.ModelConfig, keep: int, top_k: int, mapped: bool) -> config.ModelConfig:
  """The model config of a pruned model: `keep` experts, top-`top_k`; a router map from the original experts
  when `mapped` (a merge candidate)."""
  moe = dataclasses.replace(cfg.moe, num_experts=keep, top_k=top_k,
                            router_map_from=cfg.moe.num_experts if mapped else 0)
  return dataclasses.replace(cfg, moe=moe)


def selection(keep_LK: np.ndarray, E: int) -> dict[str, np.ndarray]:
  """The candidate that keeps experts `keep_LK[l]` (int [L, K]) of each layer: M = R = one-hot rows."""
  onehot = np.eye(E, dtype=np.float32)[np.asarray(keep_LK)]  # [L, K, E]
  return {"M": onehot, "R": onehot.copy()}


def identity(num_layers: int, E: int) -> dict[str, np.ndarray]:
  return selection(np.tile(np.arange(E), (num_layers, 1)), E)


def as_selection(cand: dict[str, np.ndarray]) -> np.ndarray | None:
  """int [L, K] kept experts if `cand` is a pure selection (M == R, one-hot rows, distinct), else None."""
  M, R = np.asarray(cand["M"]), np.asarray(cand["R"])
  if not np.array_equal(M, R) or not np.all((M == 0) | (M == 1)) or not np.all(M.sum(-1) == 1):
    return None
  keep_LK = M.argmax(-1)
  if any(len(set(row.tolist())) != len(row) for row in keep_LK):
    return None
  return keep_LK


def merge_moe(p: dict, M_KE: jax.Array, R_KE: jax.Array) -> dict:
  """One MoE layer's params with merged experts and a router map (jit-friendly: M, R may be traced). Router
  bias (aux-loss-free balancing) is mapped like the probabilities: b' = R @ b."""
  experts = {k: jnp.einsum("KE,E...->K...", M_KE.astype(jnp.float32), w.astype(jnp.float32)).astype(w.dtype)
             for k, w in p["experts"].items()}
  r = {"w": p["router"]["w"], "map": R_KE.astype(jnp.float32)}
  if "bias" in p["router"]:
    r["bias"] = R_KE.astype(jnp.float32) @ p["router"]["bias"].astype(jnp.float32)
  return dict(p, router=r, experts=experts)


def slice_moe(p: dict, keep_K: np.ndarray) -> dict:
  """One MoE layer pruned to experts `keep_K`: router columns and experts sliced (a plain MoE, no map)."""
  idx = np.asarray(keep_K)
  r = {"w": p["router"]["w"][:, idx]}
  if "bias" in p["router"]:
    r["bias"] = p["router"]["bias"][idx]
  return dict(p, router=r, experts={k: w[idx] for k, w in p["experts"].items()})


def apply(params: dict, cfg: config.ModelConfig, cand: dict, *, mapped: bool | None = None) -> dict:
  """The pruned model's params: merged experts + `router/map` per MoE layer (`mapped`, the default unless the
  candidate is an exact selection), or sliced experts and router columns (a selection, `mapped=False`)."""
  layers = moe_layers(cfg)
  keep_LK = None
  if mapped is not True:  # (M, R may be traced when mapped=True: nothing is inspected then)
    keep_LK = as_selection(cand)
    exact = keep_LK is not None and cfg.moe.renormalize and cfg.moe.bias_balance_rate <= 0
    if mapped is None:
      mapped = not exact
    if not mapped and not exact:
      raise ValueError("apply(mapped=False) needs a selection candidate on a renormalized model without router "
                       "bias")
  out = dict(params, layers=dict(params["layers"]))
  for l, key in enumerate(layers):
    blk = dict(out["layers"][key])
    blk["moe"] = merge_moe(blk["moe"], cand["M"][l], cand["R"][l]) if mapped else slice_moe(blk["moe"], keep_LK[l])
    out["layers"][key] = blk
  return out


def is_mapped_output(cfg: config.ModelConfig, cand: dict) -> bool:
  """Whether `apply` writes a router map for this candidate (False: a plain, exportable MoE)."""
  return not (as_selection(cand) is not None and cfg.moe.renormalize and cfg.moe.bias_balance_rate <= 0)


def to_json(cand: dict) -> dict:
  return {"M": np.asarray(cand["M"]).tolist(), "R": np.asarray(cand["R"]).tolist()}


def from_json(d: dict) -> dict[str, np.ndarray]:
  return {"M": np.asarray(d["M"], np.float32), "R": np.asarray(d["R"], np.float32)}
