"""Sparse upcycling over longer budgets on the multi-domain mixture (issue 17; Komatsuzaki et al., ICLR 2023:
the upcycled model's advantage over the dense continuation grows with the extra budget).

For each budget B in +300 / +1,500 / +3,000 steps: `lm_dense_mix_<B>_tiny` (lm_dense_mix_tiny with a
300 + B step schedule) pretrains 300 steps; that checkpoint is resumed to 300 + B (dense continuation) and
upcycled by `lm_upcycle_mix_<B>_tiny` (lm_moe_mix_tiny's architecture: 8 experts, top-2, layers 1 and 3; router
N(0, 0.02); the dense step counter and schedule continued with a fresh optimizer state) to 300 + B. Both are
compared at equal steps and at equal training FLOPs (the upcycled run's count includes its dense parent).
`scripts/studies.sh lm_upcycle` runs every budget with three seeds and draws the figures.
"""

from moejax import config, registry

PRETRAIN_STEPS = 300
BUDGETS = (300, 1500, 3000)


def _dense(budget: int) -> config.ExperimentConfig:
  total = PRETRAIN_STEPS + budget
  return config.derive(registry.get("lm_dense_mix_tiny"), {
    "train.steps": total, "train.schedule_steps": total, "train.eval_every": 150 if budget <= 300 else 300,
    "train.checkpoint_every": 150 if budget <= 300 else 300,
  })


def _upcycled(budget: int) -> config.ExperimentConfig:
  return config.derive(_dense(budget), {
    "model.moe.num_experts": 8, "model.moe.top_k": 2, "model.moe.every": 2, "model.moe.offset": 1,
    "model.moe.renormalize": True, "model.moe.dispatch": "dropless",
    "model.moe.load_balance_weight": 0.01, "model.moe.z_loss_weight": 1e-3,
    "init.upcycle_from": f"runs/lm_dense_mix_{budget}_tiny", "init.router_init": "normal", "init.router_std": 0.02,
    "init.continue_step": True,
  })


@registry.register
def lm_dense_mix_300_tiny() -> config.ExperimentConfig:
  """lm_dense_mix_tiny on a 600-step schedule: pretrain 300 steps (the upcycling source), or all 600 (the dense
  continuation).

  Run:    moejax train lm_dense_mix_300_tiny train.steps=300 --workdir runs/lm_dense_mix_300_tiny
          scripts/studies.sh lm_upcycle                       (the whole study: 3 budgets x 3 seeds)
  Expect: (seeds 0-2, mean ± SE) continued to step 600: eval loss 1.993 ± 0.047 nats/byte on the mixture's
          validation split (docs/results.md, "Where upcycling should pay").
  """
  return _dense(300)


@registry.register
def lm_upcycle_mix_300_tiny() -> config.ExperimentConfig:
  """lm_dense_mix_300_tiny's step-300 checkpoint upcycled (8 experts, top-2, layers 1 and 3), to step 600.

  Run:    moejax train lm_upcycle_mix_300_tiny --workdir runs/lm_upcycle_mix_300_tiny
  Expect: (seeds 0-2) step 600: eval loss 1.964 ± 0.050; ahead of the dense continuation of the same seed by
          0.029 ± 0.005 nats at equal steps, behind by 0.036 ± 0.011 at equal training FLOPs (docs/results.md).
  """
  return _upcycled(300)


@registry.register
def lm_dense_mix_1500_tiny() -> config.ExperimentConfig:
  """lm_dense_mix_tiny on an 1,800-step schedule (pretrain 300, or the dense continuation to 1,800).

  Run:    scripts/studies.sh lm_upcycle
  Expect: (seeds 0-2) step 1,800: eval loss 1.585 ± 0.028 nats/byte on the mixture (docs/results.md).
  """
  return _dense(1500)


@registry.register
def lm_upcycle_mix_1500_tiny() -> config.ExperimentConfig:
  """lm_dense_mix_1500_tiny's step-300 checkpoint upcycled, to step 1,800.

  Run:    scripts/studies.sh lm_upcycle
  Expect: (seeds 0-2) step 1,800: eval loss 1.545 ± 0.030, 0.041 ± 0.007 ahead of the dense continuation at
          equal steps (paired), 0.075 ± 0.019 behind at equal training FLOPs (docs/results.md).
  """
  return _upcycled(1500)


@registry.register
def lm_dense_mix_3000_tiny() -> config.ExperimentConfig:
  """lm_dense_mix_tiny on a 3,300-step schedule (pretrain 300, or the dense continuation to 3,300).

  Run:    scripts/studies.sh lm_upcycle
  Expect: (seeds 0-2) step 3,300: eval loss 1.400 ± 0.015 nats/byte on the mixture (docs/results.md).
  """
  return _dense(3000)


@registry.register
def lm_upcycle_mix_3000_tiny() -> config.ExperimentConfig:
  """lm_dense_mix_3000_tiny's step-300 checkpoint upcycled, to step 3,300.

  Run:    scripts/studies.sh lm_upcycle
  Expect: (seeds 0-2) step 3,300: eval loss 1.374 ± 0.016, 0.027 ± 0.007 ahead of the dense continuation at
          equal steps (paired), 0.061 ± 0.019 behind at equal training FLOPs (docs/results.md).
  """
  return _upcycled(3000)


# ----------------------------------------------------------------------------------------------------------
# Mature parents (issue 30): a warmup-stable-decay schedule, so one long dense pretraining is the parent of
# every budget and each arm decays over its own length.
# ----------------------------------------------------------------------------------------------------------

MATURE_PARENT_STEPS = 3000


def _wsd_dense() -> config.ExperimentConfig:
  return config.derive(registry.get("lm_dense_mix_tiny"), {
    "optim.decay_start": MATURE_PARENT_STEPS, "optim.min_lr_ratio": 0.0,
    "train.steps": MATURE_PARENT_STEPS + 1500, "train.schedule_steps": MATURE_PARENT_STEPS + 1500,
    "train.eval_every": 300, "train.checkpoint_every": 300,
  })


@registry.register
def lm_dense_mix_wsd_tiny() -> config.ExperimentConfig:
  """`lm_dense_mix_tiny` on a warmup-stable-decay schedule: warmup, constant LR to step 3,000 (the mature
  parent: `optim.schedule=constant train.steps=3000`), then cosine to zero by step 4,500 (the dense
  continuation of the +1,500 arm; other budgets and parent lengths by `optim.decay_start`, `train.steps`,
  `train.schedule_steps`, as scripts/studies.py lm_mature sets them).

  Run:    moejax train lm_dense_mix_wsd_tiny optim.schedule=constant train.steps=3000 --workdir runs/parent
          scripts/studies.sh lm_mature                          (parent, continuations, upcycled, FLOP-matched)
  Expect: the parent's eval loss flattens over its constant-LR phase and the cosine continuation drops below
          it (docs/results.md, "Mature parents": the study's tables and figures, regenerated by that command).
  """
  return _wsd_dense()


@registry.register
def lm_upcycle_mix_wsd_tiny() -> config.ExperimentConfig:
  """`lm_dense_mix_wsd_tiny`'s parent upcycled (8 experts, top-2, layers 1 and 3, as `lm_upcycle_mix_300_tiny`),
  continuing its step, data stream and schedule: constant LR to the parent's step, cosine to zero at the end.

  Run:    scripts/studies.sh lm_mature
  Expect: at its first step it computes the parent's function (its curve starts at the parent's last eval); its
          results against the dense continuation and the FLOP-matched dense arm are in docs/results.md.
  """
  return config.derive(_wsd_dense(), {
    "model.moe.num_experts": 8, "model.moe.top_k": 2, "model.moe.every": 2, "model.moe.offset": 1,
    "model.moe.renormalize": True, "model.moe.dispatch": "dropless",
    "model.moe.load_balance_weight": 0.01, "model.moe.z_loss_weight": 1e-3,
    "init.upcycle_from": "runs/lm_dense_mix_wsd_tiny", "init.router_init": "normal", "init.router_std": 0.02,
    "init.continue_step": True,
  })
