"""CLIP-UP where capacity matters (issue 17): the tiny CLIP recipe of `clip.py` on `moejax_scenes` (compositional
shape scenes, an unlimited training stream, held-out compositions in evaluation; data/scenes.py).

The study (`scripts/studies.sh clip_up`, three seeds each): a dense CLIP pretrains `PRETRAIN_STEPS` steps of a
`PRETRAIN_STEPS + budget` step schedule; the remaining budget (+300 or +1,500 steps) is spent as
  dense continued   the dense run resumed to the end of its schedule
  CLIP-UP           that checkpoint upcycled (both towers, 8 experts, top-2, every other MLP), half the LR
  sparse scratch    the CLIP-UP architecture trained from scratch for all steps
  dense active      a dense model with CLIP-UP's active FLOPs per token (d_ff x 1.5 in every layer: the MoE
                    layers' top-2 doubles their MLP, two of four layers are MoE) from scratch for all steps
and at the +300 budget the recipe's knobs: a shared backbone (one set of blocks for both modalities, dense
pretrain + CLIP-UP) and capacity dispatch (capacity factors 1.0 / 1.5 / 2.0 instead of dropless).
`scenes_clip_dense_large_tiny` (4x the dense tower width budget) is the capacity check: the tiny towers'
loss is still falling where the larger model's is far lower (docs/img/scenes_capacity.png).

Differences from `clip.py`: captions are longer (text towers read 96 byte tokens), no augmentation (the stream
never repeats a scene), evaluation on all 1,024 validation scenes (half contain a held-out composition).
"""

from moejax import config, registry
from moejax.data import scenes

PRETRAIN_STEPS = 300
BUDGETS = (300, 1500)
CAPACITY_FACTORS = (1.0, 1.5, 2.0)


def _total(budget: int) -> dict:
  return {"train.steps": PRETRAIN_STEPS + budget, "train.schedule_steps": PRETRAIN_STEPS + budget}


def _scenes(base: config.ExperimentConfig, budget: int) -> config.ExperimentConfig:
  return config.derive(base, {
    "data.dataset": "moejax_scenes", "clip.text.max_seq_len": 96, "clip.augment_shift": 0,
    "clip.augment_noise": 0.0, "clip.zeroshot_templates": scenes.zeroshot_templates(), **_total(budget),
  })


def _dense(budget: int) -> config.ExperimentConfig:
  return _scenes(registry.get("clip_dense_tiny"), budget)


def _up(budget: int) -> config.ExperimentConfig:
  return _scenes(registry.get("clip_up_tiny"), budget)


def _scratch(budget: int) -> config.ExperimentConfig:
  return _scenes(registry.get("clip_sparse_scratch_tiny"), budget)


def _active(budget: int) -> config.ExperimentConfig:
  # CLIP-UP's MoE layers (1, 3) run 2 of 8 expert MLPs per token: 2 + 2*2 = 6 MLP units over 4 layers, the same
  # as 4 dense layers with d_ff 1.5x (384). The router's 64x8 matmul is left out (0.4% of a layer).
  return config.derive(_dense(budget), {"clip.vision.d_ff": 384, "clip.text.d_ff": 384})


@registry.register
def scenes_clip_dense_tiny() -> config.ExperimentConfig:
  """Dense tiny CLIP (0.4M params) on moejax_scenes; the upcycling source (train.steps=300 of its 600 schedule).

  Run:    moejax train scenes_clip_dense_tiny train.steps=300 --workdir runs/scenes_clip_dense_tiny   (source)
          scripts/studies.sh clip_up                                         (every run of the study, 3 seeds)
  Expect: (seeds 0-2, mean ± SE) step 300 of 600 scheduled: eval contrastive loss 0.659 ± 0.026 on the 1,024
          validation scenes (seed 0: 0.621, i2t / t2i R@1 39.7 / 38.9 %, zero-shot shape 25.0 %, chance 16.7 %);
          continued to step 600: 0.358 ± 0.007, t2i / i2t R@1 57.8 ± 0.4 / 57.4 ± 0.4 %. docs/results.md
          ("Where upcycling should pay").
  """
  return _dense(BUDGETS[0])


@registry.register
def scenes_clip_up_tiny() -> config.ExperimentConfig:
  """CLIP-UP on `scenes_clip_dense_tiny`'s step-300 checkpoint: both towers to 8 experts top-2 in layers 1 and 3,
  the schedule continued to step 600 at half the dense LR (clip_up_tiny's recipe).

  Run:    moejax train scenes_clip_up_tiny init.upcycle_from=runs/scenes_clip_dense_tiny --workdir runs/...
  Expect: (seeds 0-2) step 600: eval loss 0.389 ± 0.004, 0.031 ± 0.003 behind the dense continuation of the same
          seed (paired), t2i / i2t R@1 57.1 ± 0.3 / 56.2 ± 0.7 %. docs/results.md ("Where upcycling should pay").
  """
  return config.derive(_up(BUDGETS[0]), {"init.upcycle_from": "runs/scenes_clip_dense_tiny"})


@registry.register
def scenes_clip_sparse_scratch_tiny() -> config.ExperimentConfig:
  """CLIP-UP's architecture from scratch with the dense recipe for all 600 steps.

  Run:    moejax train scenes_clip_sparse_scratch_tiny --workdir runs/scenes_clip_sparse_scratch_tiny
  Expect: (seeds 0-2) step 600: eval loss 0.346 ± 0.014, level with the dense continuation of the same seed
          (0.012 ± 0.019 ahead, paired), 0.050 ± 0.014 behind at equal training FLOPs. docs/results.md.
  """
  return _scratch(BUDGETS[0])


@registry.register
def scenes_clip_dense_active_tiny() -> config.ExperimentConfig:
  """Dense towers with CLIP-UP's active FLOPs per token (d_ff 384 in every layer) from scratch, 600 steps.

  Run:    moejax train scenes_clip_dense_active_tiny --workdir runs/scenes_clip_dense_active_tiny
  Expect: (seeds 0-2) step 600: eval loss 0.333 ± 0.009, 0.025 ± 0.016 ahead of the dense continuation
          (paired), t2i / i2t R@1 60.2 ± 0.5 / 60.4 ± 0.9 %. docs/results.md.
  """
  return _active(BUDGETS[0])


@registry.register
def scenes_clip_dense_1500_tiny() -> config.ExperimentConfig:
  """`scenes_clip_dense_tiny` with the +1,500 budget: 300 of 1,800 scheduled steps pretrain, continued to 1,800.

  Run:    scripts/studies.sh clip_up     (runs it with the other +1,500 runs)
  Expect: (seeds 0-2) step 1,800: eval loss 0.103 ± 0.012, t2i / i2t R@1 79.8 ± 0.5 / 78.4 ± 1.0 %.
          docs/results.md ("CLIP-UP at +1,500 steps").
  """
  return _dense(BUDGETS[1])


@registry.register
def scenes_clip_up_1500_tiny() -> config.ExperimentConfig:
  """`scenes_clip_up_tiny` with the +1,500 budget (upcycled at 300, continued to 1,800).

  Run:    scripts/studies.sh clip_up
  Expect: (seeds 0-2) step 1,800: eval loss 0.151 ± 0.023, 0.048 ± 0.016 behind the dense continuation
          (paired; ahead early in every seed), 0.068 ± 0.016 behind at equal training FLOPs. docs/results.md.
  """
  return config.derive(_up(BUDGETS[1]), {"init.upcycle_from": "runs/scenes_clip_dense_1500_tiny"})


@registry.register
def scenes_clip_sparse_scratch_1500_tiny() -> config.ExperimentConfig:
  """`scenes_clip_sparse_scratch_tiny` for 1,800 steps.

  Run:    scripts/studies.sh clip_up
  Expect: (seeds 0-2) step 1,800: eval loss 0.138 ± 0.019, 0.035 ± 0.011 behind the dense continuation
          (paired), zero-shot shape 47.1 ± 1.2 % against its 44.2 ± 1.2 %. docs/results.md.
  """
  return _scratch(BUDGETS[1])


@registry.register
def scenes_clip_dense_active_1500_tiny() -> config.ExperimentConfig:
  """`scenes_clip_dense_active_tiny` for 1,800 steps.

  Run:    scripts/studies.sh clip_up
  Expect: (seeds 0-2) step 1,800: eval loss 0.113 ± 0.006, level with the dense continuation (0.010 ± 0.007
          behind, paired). docs/results.md.
  """
  return _active(BUDGETS[1])


@registry.register
def scenes_clip_dense_shared_tiny() -> config.ExperimentConfig:
  """The dense tiny CLIP with one shared backbone for both modalities (LIMoE-style); CLIP-UP's shared source.

  Run:    moejax train scenes_clip_dense_shared_tiny train.steps=300 --workdir runs/scenes_clip_dense_shared_tiny
  Expect: (seeds 0-2) step 300 of 600: eval loss 0.819 / 0.720 / 0.766, behind the two-tower dense model of
          the same seed in every seed (0.621 / 0.708 / 0.647). docs/results.md ("A shared backbone").
  """
  return config.derive(_dense(BUDGETS[0]), {"clip.shared_backbone": True})


@registry.register
def scenes_clip_up_shared_tiny() -> config.ExperimentConfig:
  """CLIP-UP from the shared-backbone dense model: the one backbone upcycled (8 experts, top-2, layers 1, 3);
  the paper's separated-vs-shared comparison is this run against `scenes_clip_up_tiny`.

  Run:    moejax train scenes_clip_up_shared_tiny --workdir runs/scenes_clip_up_shared_tiny
  Expect: (seeds 0-2) step 600: eval loss 0.473 ± 0.014, 0.084 ± 0.010 behind CLIP-UP with separate towers
          (paired). docs/results.md.
  """
  return config.derive(_up(BUDGETS[0]), {"clip.shared_backbone": True,
                                         "init.upcycle_from": "runs/scenes_clip_dense_shared_tiny"})


@registry.register
def scenes_clip_up_capacity_tiny() -> config.ExperimentConfig:
  """CLIP-UP with capacity dispatch (each expert takes at most capacity_factor x its even share of the routed
  tokens, the rest dropped and carried by the residual) instead of dropless; the study runs factors 1.0, 1.5, 2.0.

  Run:    moejax train scenes_clip_up_capacity_tiny clip.vision.moe.capacity_factor=1.5 \
            clip.text.moe.capacity_factor=1.5 --workdir runs/...
  Expect: (seeds 0-2) step 600: eval loss 0.408 / 0.404 / 0.396 at factors 1.0 / 1.5 / 2.0, 0.019 / 0.016 /
          0.008 behind dropless CLIP-UP (paired), 29-33 / 16-17 / 8-9 % of picks dropped. docs/results.md.
  """
  return config.derive(scenes_clip_up_tiny(), {
    "clip.vision.moe.dispatch": "capacity", "clip.text.moe.dispatch": "capacity",
    "clip.vision.moe.capacity_factor": CAPACITY_FACTORS[0], "clip.text.moe.capacity_factor": CAPACITY_FACTORS[0],
  })


@registry.register
def scenes_clip_dense_large_tiny() -> config.ExperimentConfig:
  """The capacity check's larger dense CLIP: towers of width 128, d_ff 512 (4x the tiny towers' parameters).

  Run:    moejax train scenes_clip_dense_large_tiny train.steps=300 --workdir runs/scenes_clip_dense_large_tiny
  Expect: (seed 0, train.steps=150 of the 600-step schedule) eval contrastive loss 1.136, i2t / t2i R@1 22.6 /
          23.9 % at step 150 (the tiny model: 2.031 at step 100, 0.883 at 200); docs/img/scenes_capacity.png.
  """
  return config.derive(_dense(BUDGETS[0]), {
    "clip.vision.d_model": 128, "clip.vision.d_ff": 512, "clip.text.d_model": 128, "clip.text.d_ff": 512,
    "clip.embed_dim": 128,
  })


# ----------------------------------------------------------------------------------------------------------
# Mature parents (issue 30): warmup-stable-decay, as experiments/lm_upcycle_mix.py's `*_wsd_tiny`
# ----------------------------------------------------------------------------------------------------------

MATURE_PARENT_STEPS = 3000
_WSD = {"optim.decay_start": MATURE_PARENT_STEPS, "optim.min_lr_ratio": 0.0,
        "train.steps": MATURE_PARENT_STEPS + 1500, "train.schedule_steps": MATURE_PARENT_STEPS + 1500,
        "train.eval_every": 500, "train.checkpoint_every": 500}


@registry.register
def scenes_clip_dense_wsd_tiny() -> config.ExperimentConfig:
  """`scenes_clip_dense_tiny` on a warmup-stable-decay schedule: constant LR to step 3,000 (the mature parent:
  `optim.schedule=constant train.steps=3000`), then cosine to zero by 4,500 (the dense continuation; other
  lengths by `optim.decay_start` / `train.steps` / `train.schedule_steps`, as scripts/studies.py clip_mature sets).

  Run:    scripts/studies.sh clip_mature
  Expect: the parent's eval loss flattens at constant LR; the arms' tables and figures are in docs/results.md
          ("Mature parents"), regenerated by that command.
  """
  return config.derive(_dense(BUDGETS[0]), _WSD)


@registry.register
def scenes_clip_up_wsd_tiny() -> config.ExperimentConfig:
  """CLIP-UP (the recipe: both towers, 8 experts, top-2, every other MLP, half the dense LR) from
  `scenes_clip_dense_wsd_tiny`'s parent, continuing its step, data stream and schedule shape.

  Run:    scripts/studies.sh clip_mature
  Expect: at its first step it computes the parent's function; results in docs/results.md ("Mature parents").
  """
  return config.derive(_up(BUDGETS[0]), {**_WSD, "init.upcycle_from": "runs/scenes_clip_dense_wsd_tiny"})


@registry.register
def scenes_clip_sparse_scratch_wsd_tiny() -> config.ExperimentConfig:
  """CLIP-UP's architecture from scratch with the dense recipe, warmup then cosine to zero over its own length
  (scripts/studies.py clip_mature sets the length: the FLOPs of the parent plus CLIP-UP's sparse phase).

  Run:    scripts/studies.sh clip_mature
  Expect: its final loss against CLIP-UP's at equal training FLOPs is in docs/results.md ("Mature parents").
  """
  return config.derive(_scratch(BUDGETS[0]), {**_WSD, "optim.decay_start": 0})
