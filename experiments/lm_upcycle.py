"""The main demo: sparse upcycling at CPU scale (Komatsuzaki et al., ICLR 2023).

`scripts/demo.sh` pretrains `lm_dense_tiny` for 300 of its 600 scheduled steps, then spends the remaining 300 steps
two ways: the dense model continues, and `lm_upcycle_tiny` (the same checkpoint upcycled to 8 experts, top-2,
in every other MLP) continues the same LR schedule and data stream. `docs/results.md` has the outcome.
"""

from moejax import config, registry

DEMO_PRETRAIN_STEPS = 300
DEMO_TOTAL_STEPS = 600


@registry.register
def lm_upcycle_tiny() -> config.ExperimentConfig:
  """`lm_dense_tiny` upcycled: E=8 experts (copies of the dense MLP), top-2 renormalized token choice, dropless,
  MoE in layers 1 and 3, router N(0, 0.02), load-balance 0.01 + z-loss 1e-3; continues the dense step and LR
  schedule (`init.continue_step`) with a fresh optimizer state to step 600.

  Run:    moejax train lm_dense_tiny train.steps=300 train.schedule_steps=600 --workdir runs/lm_dense_tiny
          moejax train lm_upcycle_tiny init.upcycle_from=runs/lm_dense_tiny     (or: scripts/demo.sh)
  Expect: validation loss 1.431 at step 600 vs 1.454 for the dense continuation (results/demo/main/, docs/results.md;
          one seed).
  """
  return config.derive(registry.get("lm_dense_tiny"), {
    "model.moe.num_experts": 8, "model.moe.top_k": 2, "model.moe.every": 2, "model.moe.offset": 1,
    "model.moe.renormalize": True, "model.moe.dispatch": "dropless",
    "init.upcycle_from": "runs/lm_dense_tiny", "init.router_init": "normal", "init.router_std": 0.02,
    "init.continue_step": True,
    "train.steps": DEMO_TOTAL_STEPS, "train.schedule_steps": DEMO_TOTAL_STEPS,
  })
