"""Moving between a moejax run directory and a Flax model of moejax's decoder (`moejax.flax.Transformer`).

- `load_run(workdir)`: the newest checkpoint's params and the run's config -> a `Transformer` (NNX) to continue
  in your own loop (or `linen.variables(model.params(), specs)` for Linen).
- `save_run(model, exp, workdir)`: a `Transformer`'s params as a params-only step-0 checkpoint (what
  `moejax import-hf` and `moejax upcycle` write), so `moejax train NAME --workdir DIR` continues from it with a
  fresh optimizer state. Refuses to write into a directory that already holds checkpoints.
"""

from __future__ import annotations

import pathlib

import jax

from moejax import checkpoint, config, runs, sharding
from moejax.flax import modules
from moejax.models import transformer


def load_run(workdir: str | pathlib.Path, **kw) -> modules.Transformer:
  """A decoder-LM run's newest params (and its config) as an NNX `Transformer`, on one device."""
  exp = checkpoint.read_config(workdir)
  if exp.task != "lm":
    raise config.ConfigError(f"load_run: {workdir} is a {exp.task!r} run; only decoder LM runs (task 'lm') map "
                             "onto moejax.flax.Transformer")
  dev = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=dev),
                          transformer.specs(exp.model), is_leaf=sharding.is_spec)
  params, _ = checkpoint.load_params(workdir, abstract)
  return modules.Transformer.from_params(params, exp.model, **kw)


def save_run(model: modules.Transformer, exp: config.ExperimentConfig, workdir: str | pathlib.Path) -> pathlib.Path:
  """Write `model`'s params as step 0 of a moejax run of `exp` (its `model` must be the module's config)."""
  if exp.task != "lm" or exp.model != model.cfg:
    raise config.ConfigError("save_run: exp.model differs from the module's config (or exp.task is not 'lm'); "
                             "pass the experiment the model was built from")
  root = runs.check_destination(workdir, what="save_run: workdir")  # a FileExistsError (and a ConfigError)
  return runs.write_params_run(root, runs.target(exp), model.params(), what="save_run: workdir")
