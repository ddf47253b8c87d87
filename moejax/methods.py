"""Training methods: how a config trains. `get(cfg)` returns the method module the trainer (train.py) calls; the
table names module paths and imports them on first use (as tasks/__init__ does), so the core imports no method.

A method module exposes `setup(cfg, mesh) -> Setup`, `init_state(s, key, params=None, step=0)`,
`make_train_step(s)`, `make_eval_step(s)`, `check_restored(s, state, verb)` (a restored state fits what was
set up: a fine-tune's base) and `full_params(s, params)` (the model as one ordinary param tree, for the task's
own evals); one that drives its own loop also has `train(cfg, workdir, mesh=, progress=)` (a TTMM bank) and
may refuse `moejax eval` with `check_eval(cfg, workdir)`. The method is derived from the config, so saved
configs and the CLI name none: `ttmm.clusters` > 0 is a TTMM bank, else `peft.method` (none: full training).
"""

import importlib
from types import ModuleType

from moejax import config

_METHODS = {"full": "moejax.full", "lora": "moejax.peft.trainer", "spiel_ag": "moejax.peft.trainer",
            "spiel_ma": "moejax.peft.trainer", "ttmm": "moejax.ttmm.method"}


def name(cfg: config.ExperimentConfig) -> str:
  if cfg.ttmm.clusters:
    return "ttmm"
  return "full" if cfg.peft.method == "none" else cfg.peft.method


def names() -> list[str]:
  return sorted(_METHODS)


def get(cfg: config.ExperimentConfig) -> ModuleType:
  n = name(cfg)
  if n not in _METHODS:
    raise config.ConfigError(f"no training method {n!r}; known: {', '.join(sorted(_METHODS))}")
  return importlib.import_module(_METHODS[n])
