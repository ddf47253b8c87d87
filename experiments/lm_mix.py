"""Decoders trained on a mixture of domains: English docs, Python source and exact-match tasks.

`lm_moe_mix_tiny` and its dense twin `lm_dense_mix_tiny` read the same mixture (data/mixture.py): Python's
documentation (`moejax_pydoc`), its standard library source (`moejax_pycode`) and the synthetic tasks
(`moejax_tasks`: addition, sort, reverse, lookup; loss on the answers only), by packed sequence 0.4 / 0.4 / 0.2.
Eval reports every domain on its own (loss, token accuracy; exact match per task) and, for the MoE model, the
expert load per domain per layer: `moejax report` draws it as `domain_expert_load.png`.
"""

from moejax import config, registry

MIXTURE = (("moejax_pydoc", 0.4), ("moejax_pycode", 0.4), ("moejax_tasks", 0.2))


@registry.register
def lm_dense_mix_tiny() -> config.ExperimentConfig:
  """4-layer dense decoder (d 128, 1.1M params) on the pydoc/pycode/tasks mixture, bytes + EOS/PAD as tokens.

  Run:    moejax train lm_dense_mix_tiny --workdir runs/lm_dense_mix_tiny && moejax report runs/lm_dense_mix_tiny
  Expect: after 400 steps (seed 0; 19.1 min on 2 CPU cores shared with other jobs, load average ~19), eval loss
          per domain (nats/token): pydoc 2.002, pycode 2.245, tasks (answer tokens) 2.176; mixed stream 2.198
          (the MoE twin: 1.924 / 2.206 / 2.212, 2.147). Exact match on 64 test examples per task: addition 0,
          sort 0, reverse 0, lookup 0.172 (chance ~0.1). docs/results.md compares the two.
  """
  return config.ExperimentConfig(
    model=config.ModelConfig(vocab_size=258, d_model=128, num_layers=4, num_heads=4, d_ff=512, max_seq_len=128),
    data=config.DataConfig(mixture=MIXTURE, tokenizer="byte_eos", seq_len=128, batch_size=16,
                           task_eval_examples=64),
    optim=config.OptimConfig(lr=3e-3, warmup_steps=30),
    train=config.TrainConfig(steps=400, eval_every=200, checkpoint_every=200, eval_steps=8),
  )


@registry.register
def lm_moe_mix_tiny() -> config.ExperimentConfig:
  """`lm_dense_mix_tiny` with 8 experts (top-2 renormalized, dropless) in layers 1 and 3; load-balance 0.01 +
  z-loss 1e-3 (as `lm_moe_tiny`). ~3.8M params, ~1.5M active per token.

  Run:    moejax train lm_moe_mix_tiny --workdir runs/lm_moe_mix_tiny && moejax report runs/lm_moe_mix_tiny
  Expect: after 400 steps (seed 0; 20.7 min on 2 CPU cores shared with other jobs, load average ~19; not timed
          idle), eval loss per domain (nats/token): pydoc 1.924, pycode 2.206, tasks (answer
          tokens) 2.212; mixed stream 2.147. Exact match on 64 test examples per task: addition 0, sort 0,
          reverse 0, lookup 0.109 (chance is ~0.1): at this size and step count the tasks are not learned. Expert load per domain (docs/img/lm_moe_mix_tiny_domain_expert_load.png): pydoc
          and pycode route alike, the tasks differently (layer 1: experts 1 and 3 take 0.20 and 0.23 of task
          tokens vs 0.06 and 0.09 of pydoc's; layer 3: expert 0 0.20 vs 0.08).
  """
  return config.derive(lm_dense_mix_tiny(), {
    "model.moe.num_experts": 8, "model.moe.top_k": 2, "model.moe.every": 2, "model.moe.offset": 1,
    "model.moe.renormalize": True, "model.moe.dispatch": "dropless",
    "model.moe.load_balance_weight": 0.01, "model.moe.z_loss_weight": 1e-3,
  })


@registry.register
def lm_moe_mix_eep() -> config.ExperimentConfig:
  """The expert-pruning study's model (`moejax prune`, docs/results.md "Expert pruning"): `lm_moe_mix_tiny` on a
  mixture that weights the tasks more (pydoc 0.2 / pycode 0.2 / tasks 0.6) and keeps two tasks the tiny model
  can learn in a CPU budget (lookup, reverse), so pruning for a task has an accuracy to keep.

  Run:    moejax train lm_moe_mix_eep --workdir runs/lm_moe_mix_eep
  Expect: after 600 steps (seed 0; 30.5 min on 2 CPU cores shared with other jobs, load average ~16) eval loss
          pydoc 1.935, pycode 2.379, tasks (answer tokens) 1.315; exact match on all 500 test examples: lookup
          0.160, reverse 0.094 (learned only weakly). The pruning study: docs/results.md, "Expert pruning".
  """
  return config.derive(lm_moe_mix_tiny(), {
    "data.mixture": (("moejax_pydoc", 0.2), ("moejax_pycode", 0.2), ("moejax_tasks", 0.6)),
    "data.tasks": ("lookup", "reverse"), "train.steps": 600, "train.eval_every": 300,
    "train.checkpoint_every": 300,
  })


@registry.register
def lm_moe_mix_tasks() -> config.ExperimentConfig:
  """An MoE decoder that knows its tasks (issue 31): `lm_moe_mix_eep` on three tasks (lookup, reverse, sort) for
  4,000 steps, long enough that two of them are learned; the base of the expert-pruning study.

  Run:    moejax train lm_moe_mix_tasks --workdir runs/lm_moe_mix_tasks
          moejax eval lm_moe_mix_tasks data.task_eval_examples=500 train.eval_steps=32 --workdir runs/lm_moe_mix_tasks
  Expect: after 4,000 steps (seed 0; 62 min on 2 CPU cores shared with 2-3 other jobs, load average 5-13), exact
          match on all 500 test examples per task: reverse 0.984, sort 0.930, lookup 0.360 (chance ~0.1); eval
          loss (32 batches) pydoc 1.147, pycode 1.557 nats/token, task answers 0.108. The stored run (config,
          metrics, the eval above with its machine and commit): results/runs/lm_moe_mix_tasks/
          (tests/test_tasks_base.py checks this docstring and the registered config against it).
  """
  return config.derive(lm_moe_mix_eep(), {
    "data.tasks": ("lookup", "reverse", "sort"), "data.task_eval_examples": 128, "train.steps": 4000,
    "train.eval_every": 500, "train.checkpoint_every": 250,
  })
