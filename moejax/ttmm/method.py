"""A TTMM bank as a training method (methods.py: any config with `ttmm.clusters` > 0): `moejax train` of such a
config builds the bank (bank.build_config: embed, cluster, then the K experts' loop, which draws each expert's
batches from its cluster by step); its step is the trainer's one step (`step.make_train_step`) with the
fine-tuning trainer's LoRA pair, vmapped over the experts (experts.py)."""

from __future__ import annotations

import pathlib
from typing import Any

import jax

from moejax import config
from moejax.ttmm import bank, experts

setup = experts.setup
make_train_step = experts.make_train_step


def train(cfg: config.ExperimentConfig, workdir: str | pathlib.Path, *, progress: bool = True,
          mesh: Any = None) -> dict:
  return bank.build_config(cfg, workdir, progress=progress, mesh=mesh)


def init_state(es: experts.ExpertSetup, key: jax.Array, params: Any | None = None, step: int = 0) -> dict:
  """The K experts' fresh state (a bank always starts at step 0 from fresh LoRAs)."""
  if params is not None or step:
    raise config.ConfigError("a TTMM bank starts from fresh LoRA experts at step 0 (no initial params)")
  return experts.init_state(es, key)


def make_eval_step(es: experts.ExpertSetup):
  check_eval(es.cfg, "this bank")


def check_eval(cfg: config.ExperimentConfig, workdir: Any) -> None:
  raise config.ConfigError(f"{workdir} is a TTMM bank ({cfg.ttmm.clusters} LoRA experts on the base "
                           f"{cfg.init.peft_from}), not one model: evaluate it with `moejax ttmm eval --bank "
                           f"{workdir}`")


def check_restored(es: experts.ExpertSetup, state: dict, verb: str = "resume") -> None:
  bank.check_base(es, state, pathlib.Path(es.cfg.name))


def full_params(es: experts.ExpertSetup, params: Any) -> Any:
  raise config.ConfigError(f"a TTMM bank ({es.k} LoRA experts) is no one model: merge experts per prompt "
                           "(`moejax generate --workdir BASE --ttmm BANK`)")
