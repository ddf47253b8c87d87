"""Pruning baselines with the same number of kept experts (EEP, Liu et al. 2024, sec. 4): a random subset,
the most frequently routed experts, and the experts with the largest summed router probability ("soft
activation"), the router statistics taken on the calibration examples (real tokens only: prompt, answer, EOS).
The fourth baseline, the best phase-1 pruning of the search, is `search.best(archive, selections_only=True)`."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moejax import config, routers
from moejax.layers import embed
from moejax.models import transformer
from moejax.prune import candidates

METHODS = ("eep", "random", "frequency", "soft")


def router_stats(params: dict, cfg: config.ModelConfig, batch: dict) -> dict[str, np.ndarray]:
  """{"frequency": [L, E] top-k choices, "soft": [L, E] summed router probabilities} over the real tokens of
  `batch` (positions up to each example's EOS), for the MoE layers in `candidates.moe_layers` order. The layers
  are the model's own block (`transformer.block_apply`), tapped for each MoE layer's input."""
  tokens_BT = batch["tokens"][:, :-1]
  mask_BT = batch["loss_mask"][:, 1:]
  T = tokens_BT.shape[1]
  last_B = T - 1 - np.argmax(np.asarray(mask_BT)[:, ::-1], 1)
  valid_BT = jnp.asarray(np.arange(T)[None] <= last_B[:, None], jnp.float32)

  @jax.jit
  def stats(params, tokens_BT):
    x = embed.lookup(params["embed"], tokens_BT, transformer.DTYPES[cfg.compute_dtype])
    freq, soft = [], []
    for i in range(cfg.num_layers):
      p = params["layers"][str(i)]
      x, aux = transformer.block_apply(p, x, cfg, causal=True, rng=None, train=False, tap=True)
      if "moe" in p:
        probs_BTE, tc = routers.choose_experts(p["moe"]["router"], aux["mlp_in"], cfg.moe)
        onehot = jax.nn.one_hot(tc.expert_GSK, probs_BTE.shape[-1]).sum(2)
        freq.append(jnp.einsum("BTE,BT->E", onehot, valid_BT))
        soft.append(jnp.einsum("BTE,BT->E", probs_BTE, valid_BT))
    return jnp.stack(freq), jnp.stack(soft)

  f, s = jax.device_get(stats(params, tokens_BT))
  return {"frequency": np.asarray(f), "soft": np.asarray(s)}


def top_experts(score_LE: np.ndarray, keep: int) -> np.ndarray:
  """int [L, K]: each layer's `keep` highest-scoring experts, ascending by index (ties: the lower index)."""
  return np.sort(np.argsort(-score_LE, axis=1, kind="stable")[:, :keep], axis=1)


def candidate(method: str, params: dict, cfg: config.ModelConfig, batch: dict, keep: int, seed: int) -> dict:
  """The pruning candidate of a baseline method (a selection)."""
  L, E = len(candidates.moe_layers(cfg)), cfg.moe.num_experts
  if method == "random":
    rng = np.random.default_rng(seed)
    return candidates.selection(np.stack([np.sort(rng.choice(E, keep, replace=False)) for _ in range(L)]), E)
  if method in ("frequency", "soft"):
    return candidates.selection(top_experts(router_stats(params, cfg, batch)[method], keep), E)
  raise config.ConfigError(f"unknown baseline {method!r}; choose one of {', '.join(METHODS[1:])}")
