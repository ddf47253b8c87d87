"""Typed, frozen experiment configs and the one override mechanism (code and CLI share it).

An experiment is a nested tree of frozen dataclasses. Variants are derived with `derive(base, {"a.b": v})` or
`apply_overrides(base, ["a.b=v"])`; both go through `_set_path`, which type-checks the value against the field
annotation and rejects unknown keys with a suggestion. Validation lives in each dataclass's `__post_init__`, so a
config that exists is a config that is valid.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from moejax import routers
from moejax.config.base import ConfigError, check
from moejax.config.data import DataConfig
from moejax.config.methods import PEFT_METHODS, PeftConfig, TtmmConfig, UpcycleConfig
from moejax.config.model import ClipConfig, ModelConfig, MoEConfig, RopeScalingConfig
from moejax.config.training import MeshConfig, OptimConfig, TrainConfig

__all__ = ["PEFT_METHODS", "ClipConfig", "ConfigError", "DataConfig", "ExperimentConfig", "MeshConfig", "ModelConfig",
           "MoEConfig", "OptimConfig", "PeftConfig", "RopeScalingConfig", "TrainConfig", "TtmmConfig",
           "UpcycleConfig", "apply_overrides", "derive", "from_dict", "from_json", "parse_override", "to_dict",
           "to_json", "validate"]


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  name: str = "unnamed"
  task: str = "lm"  # lm | clip
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  init: UpcycleConfig = UpcycleConfig()
  clip: ClipConfig = ClipConfig()  # used when task == "clip"
  peft: PeftConfig = PeftConfig()  # fine-tuning a frozen base (see moejax/peft)
  ttmm: TtmmConfig = TtmmConfig()  # test-time merging of LoRA experts (see moejax/ttmm)

  def __post_init__(self):
    check(self.task in ("lm", "clip"), f"task={self.task!r} unknown; choose 'lm' or 'clip'")
    # A decoder must not see the future: its router must be causal (the router table says which are).
    r = routers.get(self.model.moe.router)
    check(self.task != "lm" or not self.model.moe.num_experts or r.causal,
          f"model.moe.router={r.name!r} is not causal: {r.not_causal}, so a decoder's earlier outputs would "
          f"depend on later tokens; a causal LM (task='lm') needs a causal router: {routers.causal_names()} (the "
          f"others are for encoders, e.g. clip.vision.moe.router)")


# ----------------------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------------------


def _field_names(dc: Any) -> list[str]:
  return [f.name for f in dataclasses.fields(dc)]


def _all_paths(dc: Any, prefix: str = "") -> list[str]:
  out = []
  for f in dataclasses.fields(dc):
    v = getattr(dc, f.name)
    p = f"{prefix}{f.name}"
    out.append(p)
    if dataclasses.is_dataclass(v):
      out.extend(_all_paths(v, p + "."))
  return out


def _suggest(key: str, root: Any) -> str:
  close = difflib.get_close_matches(key, _all_paths(root), n=1, cutoff=0.6)
  return f"; did you mean {close[0]!r}?" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
  """Check `value` against the annotation `tp`, converting the harmless cases (int -> float, list -> tuple)."""
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if tp is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    for a in args:
      try:
        return _coerce(value, a, key)
      except ConfigError:
        pass
    raise ConfigError(f"{key}: {value!r} is not a {tp}")
  if tp is type(None):
    if value is None:
      return None
    raise ConfigError(f"{key}: expected None, got {value!r}")
  if origin is tuple:
    if isinstance(value, Mapping) and len(args) == 2 and typing.get_origin(args[0]) is tuple:
      value = list(value.items())  # {"name": weight} for a tuple of pairs (data.mixture)
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}: expected a tuple, got {type(value).__name__} {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if args and len(args) != len(value):
      raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))) if args else tuple(value)
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
    _check_number(float(value) if isinstance(value, float) else value, key)
    return float(value)
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
    _check_number(value, key)
    return value
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{key}: expected bool (True/False), got {type(value).__name__} {value!r}")
    return value
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r}")
    return value
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if isinstance(value, Mapping):
      return from_dict(tp, value, prefix=key + ".")
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
  return value


def _check_number(value: Any, key: str) -> None:
  """Every number in a config is finite and fits the int32 the trainer counts steps in: `optim.lr=1e999` parses
  to inf and `train.steps=10**30` to an int no step counter holds."""
  if isinstance(value, bool):
    return
  if isinstance(value, float) and not math.isfinite(value):
    raise ConfigError(f"{key}={value!r} is not a finite number")
  if isinstance(value, int) and not INT_MIN <= value <= INT_MAX:
    raise ConfigError(f"{key}={value} is out of range: integers in a config must lie in [{INT_MIN}, {INT_MAX}]")
  if isinstance(value, (tuple, list)):
    for i, v in enumerate(value):
      _check_number(v, f"{key}[{i}]")


INT_MIN, INT_MAX = -(2**31), 2**31 - 1


def _replace_unchecked(dc: Any, **changes: Any) -> Any:
  """`dataclasses.replace` without `__post_init__`: overrides are applied together and validated once after
  (`validate`), so their order never matters (`moe.every=1 moe.offset=0` is fine either way)."""
  new = copy.copy(dc)
  for k, v in changes.items():
    object.__setattr__(new, k, v)
  return new


def _set_path(root: Any, dotted: str, value: Any, full_key: str | None = None) -> Any:
  full_key = full_key or dotted
  head, _, rest = dotted.partition(".")
  if not dataclasses.is_dataclass(root) or head not in _field_names(root):
    raise ConfigError(f"unknown key {full_key!r}{_suggest(full_key, _ROOT.get('cfg', root))}")
  hints = typing.get_type_hints(type(root))
  if rest:
    child = getattr(root, head)
    if not dataclasses.is_dataclass(child):
      raise ConfigError(f"unknown key {full_key!r}: {head!r} is a {type(child).__name__}, not a section")
    new_child = _set_path(child, rest, value, full_key)
  else:
    new_child = _coerce(value, hints[head], full_key)
  return _replace_unchecked(root, **{head: new_child})


_ROOT: dict[str, Any] = {}  # the top-level config while an override is applied, for "did you mean" over all keys


def validate(cfg: Any, overrides: Mapping[str, Any] | None = None, prefix: str = "") -> None:
  """Check a whole config tree: every number finite and in range, then each section's `__post_init__`
  (children first, as construction does). A failing section's message is prefixed with the overrides that
  touched it (`model.moe.top_k=9: ...`)."""
  overrides = overrides or {}
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    if dataclasses.is_dataclass(v):
      validate(v, overrides, f"{prefix}{f.name}.")
    else:
      _check_number(v, prefix + f.name)
  post = getattr(type(cfg), "__post_init__", None)
  if post is None:
    return
  touched = [k for k in overrides if k.startswith(prefix) and (prefix or "." not in k)]
  blame = ", ".join(f"{k}={overrides[k]!r}" for k in touched)
  try:
    post(cfg)
  except ConfigError as e:
    raise ConfigError(f"{blame}: {e}" if blame else str(e)) from None
  except (ArithmeticError, TypeError, ValueError) as e:  # e.g. a division by a size set to 0
    where = blame or prefix.rstrip(".") or "config"
    raise ConfigError(f"{where}: invalid ({type(e).__name__}: {e})") from None


def derive(base: ExperimentConfig, overrides: Mapping[str, Any]) -> ExperimentConfig:
  """A new config with `{"a.b.c": value}` applied (the same path the CLI takes), then validated once."""
  cfg = base
  for key, value in overrides.items():
    _ROOT["cfg"] = base
    try:
      cfg = _set_path(cfg, key, value)
    finally:
      _ROOT.clear()
  validate(cfg, overrides)
  return cfg


def parse_override(text: str) -> tuple[str, Any]:
  """`"a.b=3"` -> `("a.b", 3)`. Values are Python literals (`ast.literal_eval`); bare words are strings."""
  if "=" not in text:
    raise ConfigError(f"override {text!r} must look like key=value (e.g. train.steps=100)")
  key, _, raw = text.partition("=")
  key, raw = key.strip(), raw.strip()
  if not key:
    raise ConfigError(f"override {text!r} has no key")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    if raw in ("true", "false"):
      value = raw == "true"
    elif raw.lower() in ("none", "null"):
      value = None
    else:
      value = raw  # bare words are strings: model.activation=gelu
  return key, value


def apply_overrides(base: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
  return derive(base, dict(parse_override(o) for o in overrides))


# ----------------------------------------------------------------------------------------------------------
# Serialization (JSON, never pickle)
# ----------------------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def to_json(cfg: Any) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=False)


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
  """Rebuild a config from `to_dict` output, with the same type checks and unknown-key errors as overrides."""
  if not isinstance(data, Mapping):
    raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a JSON object, got {type(data).__name__}")
  hints = typing.get_type_hints(cls)
  names = set(_field_names(cls))
  kwargs = {}
  for k, v in data.items():
    if k not in names:
      close = difflib.get_close_matches(k, sorted(names), n=1)
      hint = f"; did you mean {prefix}{close[0]!r}?" if close else ""
      raise ConfigError(f"unknown key {prefix + k!r}{hint}")
    kwargs[k] = _coerce(v, hints[k], prefix + k)
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (ArithmeticError, TypeError, ValueError) as e:
    raise ConfigError(f"{prefix.rstrip('.') or 'config'}: invalid ({type(e).__name__}: {e})") from None


def from_json(text: str) -> ExperimentConfig:
  return from_dict(ExperimentConfig, json.loads(text))
