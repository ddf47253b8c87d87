"""`moejax merge --workdir RUN --to OUT`: a fine-tuning run's newest adapters folded into its base, saved as an
ordinary run directory (params-only step, config with peft.method=none), so `moejax train`, `eval` and
`export-hf` treat it like any other run. LoRA merges exactly (W + alpha/r A@B, the same function the adapted
forward pass uses); SpIEL adds the deltas at their indices. `merged` is the same fold without the save: what
`moejax generate` and `bench infer` run a fine-tune with."""

from __future__ import annotations

import pathlib
from typing import Any

from moejax import checkpoint, config, runs, train
from moejax import step as step_lib
from moejax.peft import trainer


def merged(workdir: str | pathlib.Path, verb: str = "merge") -> tuple[step_lib.Setup, Any, int]:
  """(the merged model's Setup (peft.method=none), its params on that Setup's shardings, the step) of a
  fine-tuning run's newest adapters on the base its config records. A missing base, or one whose config or step
  changed since the fine-tune (its hash), is a ConfigError naming it; `verb` says what was refused."""
  workdir = pathlib.Path(workdir)
  cfg = checkpoint.read_config(workdir)
  if cfg.peft.method == "none":
    raise config.ConfigError(f"{workdir} is not a fine-tuning run (its peft.method is none): nothing to merge")
  if cfg.ttmm.clusters:
    raise config.ConfigError(f"{workdir} is a TTMM bank ({cfg.ttmm.clusters} LoRA experts on the base "
                             f"{cfg.init.peft_from}), not one fine-tune: use it with `moejax ttmm eval --bank` or "
                             "`moejax generate --workdir BASE --ttmm BANK`")
  s = train.setup(cfg)  # loads the base (init.peft_from)
  with checkpoint.Manager(workdir, keep=cfg.train.keep_checkpoints, async_save=False, read_only=True) as mngr:
    step, state = mngr.restore_latest(s.abstract_state, cfg=cfg, verb="eval")
  if state is None:
    raise checkpoint.CheckpointError(f"no checkpoint in {workdir}")
  trainer.check_restored(s, state, verb)
  out = train.setup(config.derive(cfg, {"peft.method": "none", "init.peft_from": ""}), s.mesh)
  return out, trainer.full_params(s, state["params"]), step


def merge_run(workdir: str | pathlib.Path, to: str | pathlib.Path) -> tuple[pathlib.Path, int]:
  workdir, to = pathlib.Path(workdir), pathlib.Path(to)
  cfg = checkpoint.read_config(workdir)
  if cfg.peft.method == "none":
    raise config.ConfigError(f"{workdir} is not a fine-tuning run (its peft.method is none): nothing to merge")
  runs.check_destination(to, source=workdir, source_is="the run itself")
  out, params, step = merged(workdir)
  runs.write_params_run(to, runs.target(out.cfg, out.mesh), params, step)
  return to, step
