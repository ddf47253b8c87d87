"""Test-time merging of local experts (TTMM; Bertolissi et al., COLM 2025): a base decoder trained on Python's
standard library source, the corpus clustered by the base's own document embeddings, one LoRA per cluster, and
at test time the prompt's nearest experts merged into the base (moejax/ttmm).

  moejax train lm_dense_pycode_tiny --workdir runs/pycode_base
  moejax ttmm build --from runs/pycode_base --clusters 4 --to runs/ttmm_k4
  moejax ttmm eval --bank runs/ttmm_k4

or, the same bank as an experiment driven by `moejax train` (resumable like any run):

  moejax train lm_pycode_ttmm4_tiny init.peft_from=runs/pycode_base --workdir runs/ttmm_k4
"""

from moejax import config, registry


@registry.register
def lm_dense_pycode_tiny() -> config.ExperimentConfig:
  """4-layer dense decoder (d 128, 1.1M params) on the bundled code corpus (`moejax_pycode`), bytes + EOS/PAD.

  Run:    moejax train lm_dense_pycode_tiny --workdir runs/pycode_base
  Expect: eval CE 2.350 nats/byte (perplexity 10.48; 8 batches of held-out stdlib modules) after 400 steps
          (seed 0; 24 min on 2 CPU cores shared with other jobs, load average ~16). The TTMM study's base
          (docs/results.md).
  """
  return config.ExperimentConfig(
    model=config.ModelConfig(vocab_size=258, d_model=128, num_layers=4, num_heads=4, d_ff=512, max_seq_len=128),
    data=config.DataConfig(dataset="moejax_pycode", tokenizer="byte_eos", seq_len=128, batch_size=16),
    optim=config.OptimConfig(lr=3e-3, warmup_steps=30),
    train=config.TrainConfig(steps=400, eval_every=200, checkpoint_every=200, eval_steps=8),
  )


@registry.register
def lm_pycode_ttmm4_tiny() -> config.ExperimentConfig:
  """A TTMM bank of 4 rank-8 LoRA experts (one per cluster of the code corpus by the base's own document
  embeddings) on `lm_dense_pycode_tiny`, 100 steps of 8 windows per expert, all 4 in one program: what
  `moejax ttmm build --clusters 4` builds, as an experiment. `init.peft_from` names the base run.

  Run:    moejax train lm_pycode_ttmm4_tiny init.peft_from=runs/pycode_base --workdir runs/ttmm_k4
          moejax ttmm eval --bank runs/ttmm_k4
  Expect: held-out perplexity below the base's. Not measured at these settings: the earlier single-seed study
          (40 steps per expert, docs/results.md's superseded TTMM table) had K = 4 at 13.60 vs the base's 14.13;
          the seeded study (scripts/ttmm_study.py) trains experts by epochs instead.
  """
  from moejax.ttmm import bank  # lazily: listing experiments does not import JAX

  return config.derive(lm_dense_pycode_tiny(), {**bank.DEFAULTS, "ttmm.clusters": 4})
