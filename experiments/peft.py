"""Parameter-efficient fine-tuning of a frozen base run: LoRA and SpIEL (sparse fine-tuning with drop-and-grow,
Ansell et al. 2024), on a dense or an MoE base. Each needs the base's run dir (or an import-hf run) in
`init.peft_from`; the model settings must be the base's.

  moejax train lm_dense_tiny --workdir runs/lm_dense_tiny
  moejax train lm_peft_spiel_ag_tiny init.peft_from=runs/lm_dense_tiny --workdir runs/ft
  moejax merge --workdir runs/ft --to runs/ft_merged && moejax export-hf runs/ft_merged --to hf_out
"""

from moejax import config, registry

_FT = {"optim.lr": 1e-3, "optim.warmup_steps": 10, "optim.weight_decay": 0.0, "train.steps": 200,
       "train.eval_every": 50, "train.checkpoint_every": 50}


@registry.register
def lm_peft_lora_tiny() -> config.ExperimentConfig:
  """Rank-4 LoRA (alpha 8) on `lm_dense_tiny`'s attention and MLP weights; the base stays frozen.

  Run:    moejax train lm_peft_lora_tiny init.peft_from=runs/lm_dense_tiny --workdir runs/lm_peft_lora_tiny
  Expect: 47k tunable params (4% of the base); see docs/results.md (fine-tuning study) for eval losses.
  """
  return config.derive(registry.get("lm_dense_tiny"), {**_FT, "peft.method": "lora", "peft.lora_rank": 4,
                                                       "peft.lora_alpha": 8.0})


@registry.register
def lm_peft_spiel_ag_tiny() -> config.ExperimentConfig:
  """SpIEL-AG on `lm_dense_tiny`: as many tunable deltas per target as the rank-4 LoRA has params, grown by
  accumulated gradients every 20 steps (5 steps of statistics), AdamW on the deltas.

  Run:    moejax train lm_peft_spiel_ag_tiny init.peft_from=runs/lm_dense_tiny --workdir runs/lm_peft_spiel_ag_tiny
  Expect: the same 47k tunable params as lm_peft_lora_tiny; see docs/results.md for eval losses.
  """
  return config.derive(registry.get("lm_dense_tiny"), {**_FT, "peft.method": "spiel_ag", "peft.match_lora_rank": 4,
                                                       "optim.lr": 1e-2})


@registry.register
def lm_peft_spiel_ma_tiny() -> config.ExperimentConfig:
  """SpIEL-MA on `lm_dense_tiny`: indices grown by SM3 row/column statistics (no dense gradient), SM3 on the
  deltas, the rank-4 LoRA's tunable count.

  Run:    moejax train lm_peft_spiel_ma_tiny init.peft_from=runs/lm_dense_tiny --workdir runs/lm_peft_spiel_ma_tiny
  Expect: the same 47k tunable params; see docs/results.md for eval losses.
  """
  return config.derive(registry.get("lm_dense_tiny"), {**_FT, "peft.method": "spiel_ma", "peft.match_lora_rank": 4,
                                                       "optim.lr": 1e-2})


@registry.register
def lm_moe_peft_spiel_ag_tiny() -> config.ExperimentConfig:
  """SpIEL-AG on the MoE base `lm_moe_tiny`: experts' w_gate/w_up/w_down get their own deltas per expert.

  Run:    moejax train lm_moe_peft_spiel_ag_tiny init.peft_from=runs/lm_moe_tiny --workdir runs/lm_moe_peft_ag
  Expect: see docs/results.md (fine-tuning study, MoE base).
  """
  return config.derive(registry.get("lm_moe_tiny"), {**_FT, "peft.method": "spiel_ag", "peft.match_lora_rank": 4,
                                                     "optim.lr": 1e-2})
