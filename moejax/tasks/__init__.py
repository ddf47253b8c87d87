"""Tasks: what a model is trained to do. `get(cfg.task)` returns the task module (see tasks/lm.py's docstring
for the contract every task module follows)."""

import importlib
from types import ModuleType

_TASKS = {"lm": "moejax.tasks.lm", "clip": "moejax.tasks.contrastive"}


def get(name: str) -> ModuleType:
  if name not in _TASKS:
    raise ValueError(f"unknown task {name!r}; known: {sorted(_TASKS)}")
  return importlib.import_module(_TASKS[name])
