"""The router table: every MoE router by name (`moe.router`), with the properties the rest of moejax asks about.
Nothing else branches on a router's name: config validation, the MoE layer, the KV-cache decoder, pruning, HF
export, flax upcycling and the benchmarks read these fields.

A router is a score function (float32 logits [G, S, E] -> probabilities, softmax by default; an EEP-merged
model's `router/map` is applied after it, `layers/router.probs`) and a selection (`select`) over them, plus:
- `capacity`: what `moe.capacity_factor` means and how many experts a token gets (`CAPACITY`);
- `causal`: a token's routing depends on that token alone, so a decoder may use it (task='lm', generation);
- `hf`: what Hugging Face export writes for it ("" = export refused, saying `no_hf`).

To add one, `register(Router(...))` from any module imported before the config is built (a test file does).
This module imports no jax, so validating a config stays cheap; the built-ins' math is `layers/router.py`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

CAPACITY = {
  "dispatch": "each token picks moe.top_k experts (a router.TokenChoice); capacity is moe.dispatch's business: "
              "dropless keeps every assignment, capacity gives each expert ceil(capacity_factor * k * S / E) slots "
              "per sequence and drops the overflow",
  "fixed": "each expert picks its C = ceil(capacity_factor * S / E) tokens of a sequence (a router.ExpertChoice): "
           "a fixed [E, G*C] buffer, about capacity_factor experts per token; moe.top_k and moe.dispatch do not apply",
}


# The built-ins' functions import jax (and layers/router) when a model first routes, not when a config is checked.


def softmax(logits_GSE: Any) -> Any:
  """The default score: softmax over the experts."""
  import jax

  return jax.nn.softmax(logits_GSE, -1)


def token_top_k(probs_GSE: Any, moe: Any, p_router: dict, capacity: int | None, valid_GS: Any) -> Any:
  """Token choice's selection: the moe.top_k best experts per token, weights renormalized by moe.renormalize,
  picks shifted by the `router/bias` of aux-loss-free balancing (`layers/router.token_choice`)."""
  from moejax.layers import router

  return router.token_choice(probs_GSE, moe.top_k, moe.renormalize, p_router.get("bias"))


def expert_top_c(probs_GSE: Any, moe: Any, p_router: dict, capacity: int | None, valid_GS: Any) -> Any:
  """Expert choice's selection: each expert's `capacity` best real tokens (`layers/router.expert_choice`)."""
  from moejax.layers import router

  return router.expert_choice(probs_GSE, capacity, valid_GS)


@dataclasses.dataclass(frozen=True)
class Router:
  """One router. `select(probs_GSE, moe_config, router_params, capacity, valid_GS)` returns a router.TokenChoice
  (capacity "dispatch"; `capacity` is None there) or a router.ExpertChoice (capacity "fixed": C per expert);
  `valid_GS` (None: all real) marks padding, which must not take a slot."""

  name: str
  select: Callable[..., Any]
  capacity: str
  causal: bool
  not_causal: str = ""  # why a decoder cannot use it (a clause; required when not `causal`)
  hf: str = ""  # the Hugging Face router it exports as; "" refuses export
  no_hf: str = "no Hugging Face MoE router computes it"
  score: Callable[[Any], Any] = softmax

  def __post_init__(self):
    if self.capacity not in CAPACITY:
      raise ValueError(f"router {self.name!r}: capacity={self.capacity!r}; choose one of {sorted(CAPACITY)}")
    if not self.causal and not self.not_causal:
      raise ValueError(f"router {self.name!r} is not causal: say why in not_causal (refusals quote it)")

  @property
  def token_picks(self) -> bool:
    """Each token picks its experts (moe.top_k of them): what the decoder's gathered path, pruning, the ragged
    expert-parallel exchange and an EEP router/map need."""
    return self.capacity == "dispatch"


TABLE: dict[str, Router] = {}


def register(r: Router) -> Router:
  if r.name in TABLE:
    raise ValueError(f"router {r.name!r} is registered already")
  TABLE[r.name] = r
  return r


def unregister(name: str) -> None:
  """Tests only: drop a router they registered."""
  TABLE.pop(name)


def names() -> list[str]:
  return list(TABLE)


def get(name: str) -> Router:
  """The router called `name` (config validation has checked that it exists)."""
  return TABLE[name]


def causal_names() -> str:
  return ", ".join(n for n, r in TABLE.items() if r.causal)


def experts_per_token(moe: Any, seq_len: int | None = None, slots: bool = False) -> float:
  """Average experts applied per token (from the router's capacity semantics, `routers.CAPACITY`), for active
  params and FLOPs: top_k for token choice; for expert choice
  E * C / S with C = router.expert_capacity(capacity_factor, S, E) (about capacity_factor; exactly that without S).
  `slots`: what capacity dispatch computes instead, its whole [E, C] buffer per group of S tokens, empty slots
  included: E * C / S with C = router.expert_capacity(capacity_factor, S, E, top_k) (about capacity_factor * top_k),
  the cost the capacity factor trades against drops; the same as without `slots` for dropless token choice."""
  from moejax.layers import router

  E = moe.num_experts
  if not get(moe.router).token_picks:
    if seq_len is None:
      return float(moe.capacity_factor)
    return E * router.expert_capacity(moe.capacity_factor, seq_len, E) / seq_len
  if not (slots and moe.dispatch == "capacity"):
    return float(moe.top_k)
  if seq_len is None:
    return float(moe.capacity_factor * moe.top_k)
  return E * router.expert_capacity(moe.capacity_factor, seq_len, E, moe.top_k) / seq_len


def choose_experts(p_router: dict, x_GSD: Any, moe: Any) -> tuple[Any, Any]:
  """(probabilities [G, S, E], top-k choices) of a token-picking router (`routers.Router.token_picks`) as at
  inference: no jitter, no padding. The decoder's gathered path and pruning's router statistics read them."""
  from moejax.layers import router

  r = get(moe.router)
  probs_GSE = router.probs(p_router, router.logits(p_router["w"], x_GSD), r.score)
  return probs_GSE, r.select(probs_GSE, moe, p_router, None, None)


register(Router(
  "token_choice", token_top_k, "dispatch", causal=True,
  hf="the softmax top-k gate of Mixtral / Qwen2-MoE (router/w -> the gate's weight, moe.renormalize -> "
     "norm_topk_prob: interop/hf_lm.py)"))
register(Router(
  "expert_choice", expert_top_c, "fixed", causal=False,
  not_causal="each expert picks its tokens from the whole sequence, later ones included",
  no_hf="HF MoE decoders route token-choice"))
