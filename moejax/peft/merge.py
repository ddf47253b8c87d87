"""`moejax merge --workdir RUN --to OUT`: a fine-tuning run's newest adapters folded into its base, saved as an
ordinary run directory (params-only step, config with peft.method=none), so `moejax train`, `eval` and
`export-hf` treat it like any other run. LoRA merges exactly (W + alpha/r A@B, the same function the adapted
forward pass uses); SpIEL adds the deltas at their indices."""

from __future__ import annotations

import pathlib

import jax

from moejax import checkpoint, config, train
from moejax.peft import trainer


def merge_run(workdir: str | pathlib.Path, to: str | pathlib.Path) -> tuple[pathlib.Path, int]:
  workdir, to = pathlib.Path(workdir), pathlib.Path(to)
  cfg = checkpoint.read_config(workdir)
  if cfg.peft.method == "none":
    raise config.ConfigError(f"{workdir} is not a fine-tuning run (its peft.method is none): nothing to merge")
  if to.resolve() == workdir.resolve():
    raise config.ConfigError(f"--to {to} is the run itself; choose a new directory")
  if (to / "checkpoints").is_dir() and any(p.name.isdigit() for p in (to / "checkpoints").iterdir()):
    raise config.ConfigError(f"{to} already holds checkpoints; choose an empty --to")
  s = train.setup(cfg)
  mngr = checkpoint.Manager(workdir, keep=cfg.train.keep_checkpoints, async_save=False)
  step, state = mngr.restore_latest(s.abstract_state)
  mngr.close()
  if state is None:
    raise FileNotFoundError(f"no checkpoint in {workdir}")
  trainer.check_restored(s, state)
  out_cfg = config.derive(cfg, {"peft.method": "none", "init.peft_from": ""})
  out = train.setup(out_cfg, s.mesh)
  params = jax.jit(lambda b, p: trainer.merged_params(s, b, p), out_shardings=out.param_shardings)(
    s.hooks.base, state["params"])
  checkpoint.write_new_run(to, step, train.params_only_state(out, params, step), out_cfg)
  return to, step
