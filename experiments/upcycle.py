"""Sparse upcycling (Komatsuzaki et al., "Sparse Upcycling: Training Mixture-of-Experts from Dense
Checkpoints", ICLR 2023): the paper's settings on our ~1B decoder. The CPU-sized demo lives beside it.

The paper's recipe: 32 experts replace every other MLP layer, each a copy of the dense MLP; the router is new,
initialized N(0, 0.02); decoders route tokens top-2 (token choice), encoders use Expert Choice with capacity
factor C = 2; training continues the dense run's schedule (step counter and learning rate) with a fresh
optimizer state. Drop-Upcycling (Nakamura et al., ICLR 2025) is one override away: `init.drop_ratio=0.5`.
"""

from moejax import config, registry

PAPER_NUM_EXPERTS = 32
PAPER_ROUTER_STD = 0.02


def paper_moe_overrides(prefix: str = "model", encoder: bool = False) -> dict:
  """The paper's MoE layer settings as overrides on the ModelConfig at `prefix` (`model`, or a CLIP tower
  such as `clip.vision`): 32 experts in every other MLP layer; top-2 token choice in a decoder, Expert Choice
  with C = 2 in an encoder. Top-k weights are renormalized, which with dropless dispatch keeps the upcycled
  decoder's function exactly the dense one's at step 0 (the paper's decoders dropped overflow tokens)."""
  o = {f"{prefix}.moe.num_experts": PAPER_NUM_EXPERTS, f"{prefix}.moe.every": 2, f"{prefix}.moe.offset": 1,
       f"{prefix}.moe.router_init_std": PAPER_ROUTER_STD}
  if encoder:
    o.update({f"{prefix}.moe.router": "expert_choice", f"{prefix}.moe.capacity_factor": 2.0})
  else:
    o.update({f"{prefix}.moe.router": "token_choice", f"{prefix}.moe.top_k": 2,
              f"{prefix}.moe.renormalize": True, f"{prefix}.moe.dispatch": "dropless"})
  return o


PAPER_INIT = {"init.router_init": "normal", "init.router_std": PAPER_ROUTER_STD, "init.continue_step": True}


@registry.register
def lm_upcycle_1b_e32() -> config.ExperimentConfig:
  """`lm_dense_1b` upcycled the paper's way: 32 experts in every other MLP (layers 1, 3, ..., 23), top-2 token
  choice, router N(0, 0.02), the dense run's step and LR schedule continued for 50k more steps (14.1B params,
  1.7B active per token). The dense cosine reaches its floor (0.1 x peak) at step 100k, so the continued
  schedule trains there; set `train.schedule_steps` to re-shape it. Experts are split over `mesh.expert=8`.

  Run:    moejax train lm_dense_1b --workdir runs/lm_dense_1b     (first: the dense run, on a TPU/GPU pod)
          moejax train lm_upcycle_1b_e32 init.upcycle_from=runs/lm_dense_1b --workdir runs/lm_upcycle_1b_e32
  Expect: not run here (paper scale; `tests/test_upcycle.py` eval_shapes the upcycling of its params).
  """
  return config.derive(registry.get("lm_dense_1b"), {
    **paper_moe_overrides("model", encoder=False),
    **PAPER_INIT,
    "init.upcycle_from": "runs/lm_dense_1b",
    "train.steps": 150_000,  # the last step: 50k more after the dense run's 100k (init.continue_step)
    "train.schedule_steps": 100_000,  # the dense run's schedule, continued
    "optim.grad_accum": 1,  # fits v5p-32 in one step (docs/benchmarks.md); the dense parent's v5e-16 needs 4
    "mesh.expert": 8,
  })
