"""Which base params a fine-tuning run adapts, and the 2-D view each is adapted in.

A target is a base weight picked by a `peft.targets` regex (fullmatch over the stable param paths). Each is seen
as `[E, R, C]`: E experts (1 for a dense weight; MoE experts' `[E, D, F]` weights are adapted per expert), R the
input side and C the output side of the matmul it performs:
  attn/wq, wk, wv  [D, H, K] -> [1, D, H*K]        attn/wo  [H, K, D] -> [1, H*K, D]
  mlp/w_up         [D, F]    -> [1, D, F]          moe/experts/w_down [E, F, D] -> [E, F, D]
LoRA factors `[E, R, r] @ [E, r, C]`; SpIEL indices are flat positions in one expert's `R*C` elements.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
from typing import Any

import jax

from moejax import config, sharding
from moejax.layers import moe


@dataclasses.dataclass(frozen=True)
class Target:
  path: str
  shape: tuple[int, ...]
  experts: int  # E: 1 for a dense weight
  rows: int  # R: the matmul's input side
  cols: int  # C: its output side

  @property
  def size(self) -> int:
    """Elements of one expert's weight."""
    return self.rows * self.cols

  @property
  def expert_axis(self) -> str | None:
    return "expert" if "/moe/experts/" in self.path else None

  def to3(self, w: jax.Array) -> jax.Array:
    return w.reshape(self.experts, self.rows, self.cols)

  def from3(self, w3: jax.Array) -> jax.Array:
    return w3.reshape(self.shape)


def view(path: str, shape: tuple[int, ...]) -> Target:
  expert = "/moe/experts/" in path
  rest = shape[1:] if expert else shape
  if len(rest) < 2:
    raise config.ConfigError(f"peft target {path} has shape {shape}: not a weight matrix (norms, biases and "
                             "router biases cannot be adapted; narrow peft.targets)")
  if path.rsplit("/", 1)[-1] == "wo":  # [H, K, D]: heads in, model width out
    rows, cols = math.prod(rest[:-1]), rest[-1]
  else:
    rows, cols = rest[0], math.prod(rest[1:])
  return Target(path, tuple(shape), shape[0] if expert else 1, rows, cols)


def select(cfg: config.ExperimentConfig, specs: Any) -> dict[str, Target]:
  """Every param matched by a `peft.targets` regex, in tree order. A regex that matches nothing is an error."""
  flat = sharding.flatten(specs, is_leaf=sharding.is_spec)
  paths = [p for p in flat if not moe.non_trainable(p)]
  out: dict[str, Target] = {}
  for i, rx in enumerate(cfg.peft.targets):
    try:
      pat = re.compile(rx)
    except re.error as e:
      raise config.ConfigError(f"peft.targets[{i}]={rx!r} is not a valid regex ({e})") from None
    hits = [p for p in paths if pat.fullmatch(p)]
    if not hits:
      close = difflib.get_close_matches(rx, paths, n=1, cutoff=0.0)
      raise config.ConfigError(f"peft.targets[{i}]={rx!r} matches no param of this model (paths look like "
                               f"{close[0] if close else paths[0]!r}; see moejax/models/transformer.py)")
    for p in hits:
      out.setdefault(p, view(p, flat[p].shape))
  return {p: out[p] for p in paths if p in out}


def get(tree: Any, path: str) -> Any:
  for k in path.split("/"):
    tree = tree[k]
  return tree


def by_target(tree: Any, targets: dict[str, Target]) -> dict[str, Any]:
  """The nested adapter / optimizer tree -> `{target path: its node}`."""
  return {p: get(tree, p) for p in targets}


def nest(flat: dict[str, Any]) -> dict[str, Any]:
  return sharding.unflatten(flat)


def replace(base: Any, new: dict[str, jax.Array]) -> Any:
  """`base` with the leaves at `new`'s paths swapped in (a new tree; `base` is not modified)."""
  flat = sharding.flatten(base)
  flat.update(new)
  return sharding.unflatten(flat)
