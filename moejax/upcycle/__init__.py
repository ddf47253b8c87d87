"""Sparse upcycling: a dense checkpoint becomes an MoE model's starting point (Komatsuzaki et al., ICLR 2023).

- `core`: the rules ("target <- source", first full regex match wins), the checked plan, and the pure,
  traceable `upcycle_params` / `upcycle` (jit- and eval_shape-able).
- `sharded`: the same under `jax.jit` with the target's out-shardings (`upcycle_fn`, `upcycle_sharded`), and
  whole experiments: `upcycle_experiment` (LM or both CLIP towers) and `from_checkpoint` (what the trainer's
  `init.upcycle_from` and `moejax upcycle` call).

Everything public is re-exported here, so callers write `upcycle.upcycle(...)`, `upcycle.RULES`, ...
"""

from moejax.upcycle.core import (
  COPY,
  ROUTER,
  RULES,
  TO_EXPERTS,
  TO_SHARED,
  ZEROS,
  Action,
  Rule,
  SpecsFn,
  Step,
  Target,
  UpcycleError,
  check_compatible,
  check_params,
  describe,
  drop_mask,
  last_layers,
  num_dropped,
  plan,
  upcycle,
  upcycle_params,
)
from moejax.upcycle.sharded import (
  check_experiment,
  dry_run,
  from_checkpoint,
  model_pairs,
  place,
  upcycle_experiment,
  upcycle_fn,
  upcycle_sharded,
)

__all__ = [
  "COPY", "ROUTER", "RULES", "TO_EXPERTS", "TO_SHARED", "ZEROS", "Action", "Rule", "SpecsFn", "Step", "Target",
  "UpcycleError", "check_compatible", "check_experiment", "check_params", "describe", "drop_mask", "dry_run",
  "from_checkpoint", "last_layers", "model_pairs", "num_dropped", "place", "plan", "upcycle",
  "upcycle_experiment", "upcycle_fn", "upcycle_params", "upcycle_sharded",
]
