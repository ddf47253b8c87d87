"""The experiment registry: `@register` zero-argument functions that return an `ExperimentConfig`.

Experiments live in the repository's `experiments/` folder (one file per family) and are discovered by path,
so they need no installation and may derive from each other through `registry.get(name)`. A user's own file
works the same way: `moejax train path/to/my_exp.py:my_name`. `MOEJAX_EXPERIMENTS` adds more folders
(`os.pathsep`-separated).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import os
import pathlib
from collections.abc import Callable

from moejax import config

ExperimentFn = Callable[[], config.ExperimentConfig]

_REGISTRY: dict[str, ExperimentFn] = {}
_LOADED_FILES: set[pathlib.Path] = set()
_DISCOVERED = False

BUILTIN_DIR = pathlib.Path(__file__).resolve().parent.parent / "experiments"


class UnknownExperiment(KeyError):
  def __str__(self) -> str:  # KeyError quotes its message; we want it plain
    return str(self.args[0])


def register(fn: ExperimentFn) -> ExperimentFn:
  """Register `fn` under its own name. The docstring should say how to run it and what to expect."""
  name = fn.__name__
  if name in _REGISTRY and _REGISTRY[name].__code__.co_filename != fn.__code__.co_filename:
    raise ValueError(f"experiment {name!r} registered twice ({_REGISTRY[name].__code__.co_filename} and "
                     f"{fn.__code__.co_filename})")
  _REGISTRY[name] = fn
  return fn


def _load_file(path: pathlib.Path) -> None:
  path = path.resolve()
  if path in _LOADED_FILES:
    return
  _LOADED_FILES.add(path)
  mod_name = "moejax_experiments_" + hashlib.sha1(str(path).encode()).hexdigest()[:10] + "_" + path.stem
  spec = importlib.util.spec_from_file_location(mod_name, path)
  if spec is None or spec.loader is None:
    raise FileNotFoundError(f"cannot load experiments from {path}")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)


def _dirs() -> list[pathlib.Path]:
  dirs = [BUILTIN_DIR]
  for d in os.environ.get("MOEJAX_EXPERIMENTS", "").split(os.pathsep):
    if d:
      dirs.append(pathlib.Path(d))
  return dirs


def discover() -> None:
  global _DISCOVERED
  if _DISCOVERED:
    return
  _DISCOVERED = True
  for d in _dirs():
    for f in sorted(d.glob("*.py")):
      if not f.name.startswith("_"):
        _load_file(f)


def names() -> list[str]:
  discover()
  return sorted(_REGISTRY)


def get_fn(name: str) -> ExperimentFn:
  """The registered function for `name`, or for `path/to/file.py:name`."""
  if ":" in name and name.split(":", 1)[0].endswith(".py"):
    file, _, fn_name = name.partition(":")
    path = pathlib.Path(file)
    if not path.exists():
      raise UnknownExperiment(f"experiment file {file!r} does not exist")
    _load_file(path)
    name = fn_name
  discover()
  if name not in _REGISTRY:
    close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "; see `moejax experiments list`"
    raise UnknownExperiment(f"unknown experiment {name!r}{hint}")
  return _REGISTRY[name]


def get(name: str, overrides: list[str] | tuple[str, ...] = ()) -> config.ExperimentConfig:
  """Resolve experiment `name` and apply `a.b=v` overrides; the result carries its own name."""
  fn = get_fn(name)
  cfg = fn()
  if not isinstance(cfg, config.ExperimentConfig):
    raise TypeError(f"experiment {name!r} returned {type(cfg).__name__}, not ExperimentConfig")
  if cfg.name != fn.__name__:
    cfg = config.derive(cfg, {"name": fn.__name__})
  return config.apply_overrides(cfg, list(overrides))


def doc(name: str) -> str:
  return (get_fn(name).__doc__ or "").strip()
