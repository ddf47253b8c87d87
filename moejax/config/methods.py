"""How a run starts and what it trains beyond full training: upcycling a dense checkpoint, fine-tuning a frozen
base (PEFT), a test-time-merging bank of LoRA experts (TTMM)."""

from __future__ import annotations

import dataclasses

from moejax.config.base import check


@dataclasses.dataclass(frozen=True)
class UpcycleConfig:
  """How a dense checkpoint becomes the MoE model at start (Komatsuzaki et al. 2023; Drop-Upcycling 2025)."""

  upcycle_from: str = ""  # a dense run's workdir or checkpoint step dir; "" = train from scratch
  router_init: str = "normal"  # normal | zeros
  router_std: float = 0.02  # the paper's code
  expert_noise_std: float = 0.0  # relative to each weight's std
  drop_ratio: float = 0.0  # Drop-Upcycling: fraction of each expert's hidden units re-initialized
  continue_step: bool = False  # continue the dense run's step counter (and so its LR schedule)
  seed: int = 0
  # Fine-tuning (peft.method != none): the frozen base, a run directory (its newest step) or an import-hf run.
  # The issue's `init.from`; `from` is a Python keyword, so the field is spelled peft_from.
  peft_from: str = ""

  def __post_init__(self):
    check(self.router_init in ("normal", "zeros"), f"init.router_init={self.router_init!r}: normal or zeros")
    check(0.0 <= self.drop_ratio <= 1.0, f"init.drop_ratio must be in [0, 1], got {self.drop_ratio}")
    check(self.router_std >= 0 and self.expert_noise_std >= 0, "init.router_std, init.expert_noise_std >= 0")


PEFT_METHODS = ("none", "lora", "spiel_ag", "spiel_ma")


@dataclasses.dataclass(frozen=True)
class PeftConfig:
  """Parameter-efficient fine-tuning of a frozen base (`init.peft_from`): LoRA, or SpIEL sparse fine-tuning
  (Ansell et al. 2024) that grows indices by accumulated gradients (spiel_ag) or SM3 statistics (spiel_ma).

  `targets` are regexes over param paths (fullmatch); MoE experts' weights [E, D, F] are adapted per expert.
  SpIEL's tunable count per target (per expert) is `density` x its size, or, when `match_lora_rank` > 0, exactly
  the count of a rank-`match_lora_rank` LoRA on it (equal-budget comparisons).
  """

  method: str = "none"  # none | lora | spiel_ag | spiel_ma
  targets: tuple[str, ...] = (r"layers/\d+/attn/w[qkvo]", r"layers/\d+/(mlp|moe/experts)/w_(gate|up|down)")
  lora_rank: int = 8
  lora_alpha: float = 16.0
  density: float = 0.01
  match_lora_rank: int = 0
  reselect: bool = True  # False: the initial (random) indices are kept (an ablation; tests)
  reselection_interval: int = 20  # steps between reselections (the reference code's setting)
  selection_accum_steps: int = 5  # steps of gradient statistics before each reselection (SpIEL-AG)
  drop_fraction: float = 0.2  # after the first reselection (which replaces everything): drop_fraction * decay(t/T)
  drop_schedule: str = "linear"  # linear: 1 - t/T | cosine: (1 + cos(pi t/T)) / 2
  sm3_eps: float = 1e-8  # SpIEL-MA's SM3 optimizer (the reference code's)
  seed: int = 0

  def __post_init__(self):
    check(self.method in PEFT_METHODS, f"peft.method={self.method!r} unknown; choose one of {', '.join(PEFT_METHODS)}")
    check(self.lora_rank >= 1 and self.lora_alpha > 0, f"peft.lora_rank={self.lora_rank} must be >= 1 and "
          f"peft.lora_alpha={self.lora_alpha} > 0")
    check(0.0 < self.density <= 1.0, f"peft.density={self.density} must be in (0, 1]")
    check(self.match_lora_rank >= 0, f"peft.match_lora_rank={self.match_lora_rank} must be >= 0")
    check(1 <= self.selection_accum_steps < self.reselection_interval,
          f"need 1 <= peft.selection_accum_steps ({self.selection_accum_steps}) < peft.reselection_interval "
          f"({self.reselection_interval})")
    check(0.0 <= self.drop_fraction <= 1.0, f"peft.drop_fraction={self.drop_fraction} must be in [0, 1]")
    check(self.drop_schedule in ("linear", "cosine"),
          f"peft.drop_schedule={self.drop_schedule!r}: choose linear or cosine")
    check(self.sm3_eps > 0, f"peft.sm3_eps={self.sm3_eps} must be > 0")
    check(bool(self.targets) or self.method == "none", "peft.targets is empty")


@dataclasses.dataclass(frozen=True)
class TtmmConfig:
  """Test-time merging of local experts (Bertolissi et al., COLM 2025; moejax/ttmm): the corpus clustered by
  document embedding into `clusters` groups, one LoRA (the `peft` section's rank/alpha/targets) per cluster, all
  trained in one program; at test time the prompt's first `prefix_tokens` tokens are embedded and the experts
  weighted by exp(-(1 - cos)/beta^2), normalised, those below `tau` dropped, at most `max_merge` kept, and merged
  into the base. Defaults are the reference code's (rbertolissi/ttmerge). Each expert trains `train.steps` steps
  on `data.batch_size` windows of its own cluster per step (all experts step together)."""

  clusters: int = 0  # K; 0 = not a TTMM bank
  beta: float = 0.2
  tau: float = 0.01
  max_merge: int = 50
  prefix_tokens: int = 50  # of the prompt, embedded at test time
  doc_tokens: int = 512  # of each training document, embedded for clustering (mean over windows of seq_len)
  embed_layer: int = -1  # which block's output is mean-pooled (-1: the last, after the final norm)
  embedder: str = "base"  # base (the base model's hidden states) | hf:<dir of a HF encoder>
  corpus: str = "moejax_pycode"  # the bundled code corpus (moejax/data/pycode.py)
  max_docs: int = 0  # 0 = every training document; N = an evenly spaced subset (tests)
  seed: int = 0  # clustering (BisectingKMeans random_state) and the experts' data order
  ttt_neighbors: int = 8  # the test-time-training baseline: a fresh LoRA fine-tuned on this many nearest documents
  ttt_steps: int = 10  # ... for this many steps (of data.batch_size windows)
  ttt_lr: float = 0.0  # ... at this learning rate (0: the bank's optim.lr)
  # Expert budget: > 0 trains expert k for ceil(epochs * its cluster's training tokens / (batch_size * seq_len))
  # steps (each expert its own length; one that is done is frozen while the longer ones go on), instead of
  # train.steps for every expert. The experts' lengths differ, so one shared LR clock would anneal only the
  # longest: it needs optim.schedule=constant (after warmup).
  epochs: float = 0.0
  train_tokens: int = 0  # each training document's first N tokens are what experts and TTT train on (0: all)
  holdout: float = 0.0  # this last fraction of each such document is held out: each expert's held-out loss on its
  #                       own cluster, logged every train.eval_every steps (is it converged? overfitting?)
  eval_part: str = "all"  # all | dev | test: the held-out documents, split in two by a hash of their names

  def __post_init__(self):
    check(self.ttt_neighbors >= 1 and self.ttt_steps >= 0,
          f"ttmm.ttt_neighbors={self.ttt_neighbors} must be >= 1 and ttmm.ttt_steps={self.ttt_steps} >= 0")
    check(self.clusters >= 0, f"ttmm.clusters={self.clusters} must be >= 0 (0: not a TTMM bank)")
    check(self.beta > 0, f"ttmm.beta={self.beta} must be > 0 (the kernel width; the reference uses 0.2)")
    check(0.0 <= self.tau < 1.0, f"ttmm.tau={self.tau} must be in [0, 1) (the reference uses 0.01)")
    check(self.max_merge >= 1, f"ttmm.max_merge={self.max_merge} must be >= 1")
    check(self.prefix_tokens >= 1 and self.doc_tokens >= 1,
          f"ttmm.prefix_tokens={self.prefix_tokens} and ttmm.doc_tokens={self.doc_tokens} must be >= 1")
    check(self.embedder == "base" or self.embedder.startswith("hf:"),
          f"ttmm.embedder={self.embedder!r} unknown; choose base or hf:<dir>")
    check(self.max_docs >= 0, f"ttmm.max_docs={self.max_docs} must be >= 0")
    check(self.epochs >= 0 and self.train_tokens >= 0 and self.ttt_lr >= 0,
          f"ttmm.epochs={self.epochs}, ttmm.train_tokens={self.train_tokens} and ttmm.ttt_lr={self.ttt_lr} must be >= 0")
    check(0.0 <= self.holdout < 1.0, f"ttmm.holdout={self.holdout} must be in [0, 1)")
    check(self.eval_part in ("all", "dev", "test"), f"ttmm.eval_part={self.eval_part!r}: choose all, dev or test")
