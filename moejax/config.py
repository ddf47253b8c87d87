"""Typed, frozen experiment configs and the one override mechanism (code and CLI share it).

An experiment is a nested tree of frozen dataclasses. Variants are derived with `derive(base, {"a.b": v})` or
`apply_overrides(base, ["a.b=v"])`; both go through `_set_path`, which type-checks the value against the field
annotation and rejects unknown keys with a suggestion. Validation lives in each dataclass's `__post_init__`, so a
config that exists is a config that is valid.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import difflib
import json
import math
import types
import typing
from collections.abc import Mapping, Sequence
from typing import Any

from moejax import routers


class ConfigError(ValueError):
  """Bad config or override: the message names the key and, where it can, the closest valid one."""


def _check(cond: bool, msg: str) -> None:
  if not cond:
    raise ConfigError(msg)


# ----------------------------------------------------------------------------------------------------------
# The config tree
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Device mesh `data x fsdp x expert x tensor`; one size may be -1 (takes the remaining devices)."""

  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1

  def __post_init__(self):
    sizes = self.shape()
    _check(sum(s == -1 for s in sizes) <= 1, f"mesh: at most one axis may be -1, got {self}")
    _check(all(s == -1 or s >= 1 for s in sizes), f"mesh: sizes must be >= 1 or -1, got {self}")

  def shape(self) -> tuple[int, int, int, int]:
    return (self.data, self.fsdp, self.expert, self.tensor)


@dataclasses.dataclass(frozen=True)
class MoEConfig:
  """Mixture-of-Experts block. `num_experts == 0` means the model is dense."""

  num_experts: int = 0
  top_k: int = 2
  # Which layers are MoE: every `every`-th layer counting from `offset` (layer i is MoE if i % every == offset),
  # or an explicit list in `layers` (which then wins).
  every: int = 2
  offset: int = 1
  layers: tuple[int, ...] = ()
  d_ff: int = 0  # per-expert hidden width; 0 -> the model's d_ff (what upcycling needs)
  router: str = "token_choice"  # a name in the router table (moejax/routers.py): token_choice | expert_choice
  renormalize: bool = True  # Mixtral renormalizes the top-k weights; Switch / vmoe do not
  dispatch: str = "dropless"  # dropless | capacity
  capacity_factor: float = 1.25  # capacity dispatch and expert-choice routing
  gmm_backend: str = "auto"  # auto | ragged_dot | sorted | dense | megablox  (see layers/gmm.py)
  jitter: float = 0.0  # multiplicative router-input noise while training (Switch)
  router_init_std: float = 0.02
  load_balance_weight: float = 0.01
  z_loss_weight: float = 1e-3
  bias_balance_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3); 0 disables
  num_shared_experts: int = 0  # always-on experts beside the routed ones (DeepSeek-MoE / Qwen-MoE)
  shared_d_ff: int = 0  # hidden width of the shared expert(s) together; 0 -> num_shared_experts * d_ff
  shared_gate: bool = False  # Qwen-MoE scales the shared output by sigmoid(x @ w)
  # EEP expert merging (moejax/prune): the router scores this many original experts and a `router/map`
  # [num_experts, router_map_from] maps its probabilities onto the kept ones; 0 -> no map (a plain router)
  router_map_from: int = 0
  # Expert parallelism's token exchange (layers/expert_parallel.py, layers/ragged_ep.py): fixed [E, R] blocks by
  # all_to_all (any backend), or ragged (lax.ragged_all_to_all, GPU/TPU only: exactly the routed rows, dropless
  # token choice). ep_buffer_factor: the ragged receive buffer in multiples of the local assignments (0 = the
  # expert-axis size, which never drops).
  ep_exchange: str = "fixed"
  ep_buffer_factor: float = 0.0

  def __post_init__(self):
    _check(self.num_experts >= 0, f"moe.num_experts must be >= 0, got {self.num_experts}")
    if self.num_experts:
      _check(1 <= self.top_k <= self.num_experts,
             f"moe.top_k={self.top_k} must be in [1, moe.num_experts={self.num_experts}]")
    if self.router not in routers.TABLE:
      close = difflib.get_close_matches(self.router, routers.names(), n=1)
      raise ConfigError(f"moe.router={self.router!r} unknown{f'; did you mean {close[0]!r}?' if close else ''} "
                        f"(routers: {', '.join(routers.names())}; they register in moejax/routers.py)")
    _check(self.dispatch in ("dropless", "capacity"),
           f"moe.dispatch={self.dispatch!r} unknown; choose 'dropless' or 'capacity'")
    _check(self.gmm_backend in ("auto", "ragged_dot", "sorted", "dense", "megablox"),
           f"moe.gmm_backend={self.gmm_backend!r} unknown; choose auto, ragged_dot, sorted, dense or megablox")
    _check(self.capacity_factor > 0, f"moe.capacity_factor must be > 0, got {self.capacity_factor}")
    _check(self.ep_exchange in ("fixed", "ragged"), f"moe.ep_exchange={self.ep_exchange!r}: choose fixed or ragged")
    _check(self.ep_buffer_factor >= 0, f"moe.ep_buffer_factor={self.ep_buffer_factor} must be >= 0 (0 = never drop)")
    token_picks = routers.get(self.router).token_picks
    _check(self.ep_exchange != "ragged" or (self.dispatch == "dropless" and token_picks),
           f"moe.ep_exchange='ragged' needs moe.dispatch='dropless' and a token-choice router (got "
           f"{self.dispatch!r}, {self.router!r}); capacity and expert-choice layouts are fixed-size already")
    _check(self.every >= 1 and 0 <= self.offset < self.every,
           f"moe.every={self.every}, moe.offset={self.offset}: need every >= 1 and 0 <= offset < every")
    _check(self.d_ff >= 0 and self.jitter >= 0 and self.num_shared_experts >= 0,
           "moe.d_ff, moe.jitter and moe.num_shared_experts must be >= 0")
    _check(self.router_map_from == 0 or (self.num_experts and token_picks),
           f"moe.router_map_from={self.router_map_from} needs a token-choice MoE (num_experts > 0)")

  def is_moe_layer(self, i: int) -> bool:
    if not self.num_experts:
      return False
    if self.layers:
      return i in self.layers
    return i % self.every == self.offset


@dataclasses.dataclass(frozen=True)
class RopeScalingConfig:
  """RoPE frequency scaling, for checkpoints trained to a longer context than their base RoPE saw.

  none: plain RoPE. linear: every frequency divided by `factor` (position interpolation). llama3: Llama 3.1's
  per-frequency rule: wavelengths longer than original_max_seq_len / low_freq_factor are divided by `factor`,
  shorter than original_max_seq_len / high_freq_factor kept, and the band between interpolated smoothly.
  """

  type: str = "none"  # none | linear | llama3
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_seq_len: int = 8192

  def __post_init__(self):
    _check(self.type in ("none", "linear", "llama3"),
           f"model.rope_scaling.type={self.type!r}: choose none, linear or llama3")
    _check(self.factor > 0, f"model.rope_scaling.factor={self.factor} must be > 0")
    if self.type == "llama3":
      _check(0 < self.low_freq_factor < self.high_freq_factor,
             f"model.rope_scaling: need 0 < low_freq_factor ({self.low_freq_factor}) < high_freq_factor "
             f"({self.high_freq_factor})")
      _check(self.original_max_seq_len > 0,
             f"model.rope_scaling.original_max_seq_len={self.original_max_seq_len} must be > 0")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Decoder-only transformer LM (pre-norm, RMSNorm, RoPE, GQA, SwiGLU or GELU MLPs)."""

  vocab_size: int = 256
  d_model: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 0  # 0 -> num_heads (no grouping)
  head_dim: int = 0  # 0 -> d_model // num_heads
  d_ff: int = 512
  activation: str = "swiglu"  # swiglu | gelu | gelu_tanh (jax.nn.gelu's default) | quick_gelu
  max_seq_len: int = 2048
  rope_theta: float = 10000.0
  rope_scaling: RopeScalingConfig = RopeScalingConfig()
  norm_eps: float = 1e-6
  tie_embeddings: bool = True
  qkv_bias: bool = False  # Qwen2-style biases on the q, k, v projections only
  bias: bool = False  # biases on every linear layer, experts included (CLIP towers)
  norm: str = "rms"  # rms | layer (CLIP towers use LayerNorm)
  param_dtype: str = "float32"
  compute_dtype: str = "float32"
  remat: bool = False
  # With remat: what each block keeps for the backward pass (models/transformer.py REMAT_POLICIES): full (only
  # the block's input), dots, dots_no_batch, save_moe (the expert MLP's output).
  remat_policy: str = "full"
  attention_impl: str = "auto"  # auto | xla | cudnn | einsum (layers/attention.py)
  moe: MoEConfig = MoEConfig()

  def __post_init__(self):
    _check(self.d_model > 0 and self.num_layers > 0 and self.num_heads > 0 and self.d_ff > 0,
           f"model: d_model, num_layers, num_heads, d_ff must be > 0, got {self}")
    _check(self.kv_heads > 0 and self.num_heads % self.kv_heads == 0,
           f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.kv_heads}")
    if not self.head_dim:
      _check(self.d_model % self.num_heads == 0,
             f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; set model.head_dim")
    _check(self.activation in ("swiglu", "gelu", "gelu_tanh", "quick_gelu"),
           f"model.activation={self.activation!r}: choose swiglu, gelu, gelu_tanh or quick_gelu")
    _check(self.norm in ("rms", "layer"), f"model.norm={self.norm!r}: choose rms or layer")
    for f in ("param_dtype", "compute_dtype"):
      v = getattr(self, f)
      _check(v in ("float32", "bfloat16", "float16"), f"model.{f}={v!r}: choose float32, bfloat16 or float16")
    _check(self.remat_policy in ("full", "dots", "dots_no_batch", "save_moe"),
           f"model.remat_policy={self.remat_policy!r}: choose full, dots, dots_no_batch or save_moe")
    _check(self.attention_impl in ("auto", "xla", "cudnn", "einsum"),
           f"model.attention_impl={self.attention_impl!r}: choose auto, xla, cudnn or einsum")
    for i in self.moe.layers:
      _check(0 <= i < self.num_layers, f"model.moe.layers has {i}, outside [0, model.num_layers={self.num_layers})")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def expert_d_ff(self) -> int:
    return self.moe.d_ff or self.d_ff


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where batches come from. `dataset` is a TFDS name; the bundled ones build offline into `tfds_dir`."""

  dataset: str = "moejax_pydoc"  # bundled: moejax_pydoc (Python's own docs, English); or any TFDS text set
  tfds_dir: str = ""  # "" -> ~/.cache/moejax/tfds (bundled sets are built there on first use)
  text_key: str = "text"
  train_split: str = "train"
  eval_split: str = "validation"
  tokenizer: str = "byte"  # byte | bpe:<path to tokenizer.json>
  seq_len: int = 128
  batch_size: int = 16  # global batch, in sequences
  shuffle_seed: int = 0
  worker_count: int = 0  # grain workers; 0 = in-process (fastest on 2 cores)
  # Several sources with weights, e.g. {"moejax_pydoc": 0.4, "moejax_pycode": 0.4, "moejax_tasks": 0.2} (a dict
  # or pairs): packed windows are drawn from each in proportion to its weight (grain's IterDataset.mix), and eval
  # reports every source on its own (data/mixture.py). Empty -> the single `dataset`. A weight of 0 keeps a
  # source out of training but in the per-source eval.
  mixture: tuple[tuple[str, float], ...] = ()
  tasks: tuple[str, ...] = ()  # which moejax_tasks tasks a task source yields; () -> all (data/tasks.py)
  answer_only_loss: bool = True  # task sources: the loss covers the answer (+ EOS), not the prompt
  task_eval_examples: int = 128  # per task, from the task source's eval split, scored by exact match

  def __post_init__(self):
    _check(self.seq_len > 0 and self.batch_size > 0, f"data.seq_len and data.batch_size must be > 0, got {self}")
    _check(self.worker_count >= 0, f"data.worker_count must be >= 0, got {self.worker_count}")
    _check(self.task_eval_examples >= 0, f"data.task_eval_examples must be >= 0, got {self.task_eval_examples}")
    names = [n for n, _ in self.mixture]
    _check(all(isinstance(n, str) and n for n in names), f"data.mixture: source names must be non-empty, got {names}")
    dup = sorted({n for n in names if names.count(n) > 1})
    _check(not dup, f"data.mixture names {dup} more than once")
    for n, w in self.mixture:
      _check(w >= 0 and w == w and w != float("inf"), f"data.mixture: weight of {n!r} is {w}; weights must be "
             "finite and >= 0")
    _check(not self.mixture or sum(w for _, w in self.mixture) > 0,
           f"data.mixture: all weights are 0 ({dict(self.mixture)}); give at least one source a weight > 0")
    if self.tasks:
      from moejax.data import tasks  # numpy only; no cycle

      try:
        tasks.check_names(self.tasks)
      except tasks.UnknownTask as e:
        raise ConfigError(f"data.tasks: {e}") from None


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW with linear warmup then cosine (or constant) decay, global-norm clipping, optional param groups."""

  lr: float = 3e-3
  warmup_steps: int = 20
  schedule: str = "cosine"  # cosine | constant | linear
  min_lr_ratio: float = 0.1
  # The step the decay starts at (constant LR from the warmup's end until then; 0 = right after the warmup): a
  # warmup-stable-decay schedule, so a run can branch off another's constant phase and decay over its own length.
  decay_start: int = 0
  weight_decay: float = 0.01
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  clip_norm: float = 1.0  # 0 disables
  grad_accum: int = 1
  # Param groups by regex over param paths (e.g. "layers/\\d+/moe/router/.*"): frozen, or an lr multiplier.
  freeze: tuple[str, ...] = ()
  lr_multipliers: tuple[tuple[str, float], ...] = ()

  def __post_init__(self):
    _check(self.lr > 0, f"optim.lr must be > 0, got {self.lr}")
    _check(self.schedule in ("cosine", "constant", "linear"), f"optim.schedule={self.schedule!r} unknown")
    _check(self.grad_accum >= 1, f"optim.grad_accum must be >= 1, got {self.grad_accum}")
    _check(self.warmup_steps >= 0 and 0 <= self.min_lr_ratio <= 1, "optim.warmup_steps >= 0, 0 <= min_lr_ratio <= 1")
    _check(self.decay_start >= 0, f"optim.decay_start must be >= 0, got {self.decay_start}")
    _check(self.weight_decay >= 0 and self.clip_norm >= 0,
           f"optim.weight_decay={self.weight_decay} and optim.clip_norm={self.clip_norm} must be >= 0")
    _check(0 <= self.b1 < 1 and 0 <= self.b2 < 1 and self.eps > 0,
           f"optim: need 0 <= b1 < 1, 0 <= b2 < 1 and eps > 0, got b1={self.b1}, b2={self.b2}, eps={self.eps}")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  steps: int = 300  # the last step (absolute: a run upcycled with init.continue_step starts past 0)
  eval_every: int = 100
  eval_steps: int = 8
  checkpoint_every: int = 100
  keep_checkpoints: int = 3
  log_every: int = 10
  seed: int = 0
  # The LR schedule's clock: total steps it decays over (0 -> train.steps). Upcycled runs that continue
  # a dense schedule set `schedule_offset` to the dense run's step.
  schedule_steps: int = 0
  nan_guard: bool = True
  # The NaN guard stops the run after this many consecutive skipped (non-finite) steps, counted on device every
  # step whatever log_every is.
  max_consecutive_skips: int = 20
  # (N, M): a jax.profiler trace of steps N..M (1-based, inclusive) into <workdir>/profile (TensorBoard / XProf /
  # Perfetto read it). () = no trace.
  profile_steps: tuple[int, ...] = ()

  def __post_init__(self):
    _check(self.steps >= 0, f"train.steps must be >= 0, got {self.steps}")
    _check(not self.profile_steps or (len(self.profile_steps) == 2 and 1 <= self.profile_steps[0] <= self.profile_steps[1]),
           f"train.profile_steps={list(self.profile_steps)}: give [N, M] with 1 <= N <= M (trace steps N..M), or []")
    _check(self.schedule_steps >= 0, f"train.schedule_steps must be >= 0, got {self.schedule_steps}")
    for f in ("eval_every", "eval_steps", "checkpoint_every", "log_every", "keep_checkpoints", "max_consecutive_skips"):
      _check(getattr(self, f) >= 1, f"train.{f} must be >= 1, got {getattr(self, f)}")


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
    _check(self.router_init in ("normal", "zeros"), f"init.router_init={self.router_init!r}: normal or zeros")
    _check(0.0 <= self.drop_ratio <= 1.0, f"init.drop_ratio must be in [0, 1], got {self.drop_ratio}")
    _check(self.router_std >= 0 and self.expert_noise_std >= 0, "init.router_std, init.expert_noise_std >= 0")


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
    _check(self.method in PEFT_METHODS, f"peft.method={self.method!r} unknown; choose one of {', '.join(PEFT_METHODS)}")
    _check(self.lora_rank >= 1 and self.lora_alpha > 0, f"peft.lora_rank={self.lora_rank} must be >= 1 and "
           f"peft.lora_alpha={self.lora_alpha} > 0")
    _check(0.0 < self.density <= 1.0, f"peft.density={self.density} must be in (0, 1]")
    _check(self.match_lora_rank >= 0, f"peft.match_lora_rank={self.match_lora_rank} must be >= 0")
    _check(1 <= self.selection_accum_steps < self.reselection_interval,
           f"need 1 <= peft.selection_accum_steps ({self.selection_accum_steps}) < peft.reselection_interval "
           f"({self.reselection_interval})")
    _check(0.0 <= self.drop_fraction <= 1.0, f"peft.drop_fraction={self.drop_fraction} must be in [0, 1]")
    _check(self.drop_schedule in ("linear", "cosine"),
           f"peft.drop_schedule={self.drop_schedule!r}: choose linear or cosine")
    _check(self.sm3_eps > 0, f"peft.sm3_eps={self.sm3_eps} must be > 0")
    _check(bool(self.targets) or self.method == "none", "peft.targets is empty")


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

  def __post_init__(self):
    _check(self.ttt_neighbors >= 1 and self.ttt_steps >= 0,
           f"ttmm.ttt_neighbors={self.ttt_neighbors} must be >= 1 and ttmm.ttt_steps={self.ttt_steps} >= 0")
    _check(self.clusters >= 0, f"ttmm.clusters={self.clusters} must be >= 0 (0: not a TTMM bank)")
    _check(self.beta > 0, f"ttmm.beta={self.beta} must be > 0 (the kernel width; the reference uses 0.2)")
    _check(0.0 <= self.tau < 1.0, f"ttmm.tau={self.tau} must be in [0, 1) (the reference uses 0.01)")
    _check(self.max_merge >= 1, f"ttmm.max_merge={self.max_merge} must be >= 1")
    _check(self.prefix_tokens >= 1 and self.doc_tokens >= 1,
           f"ttmm.prefix_tokens={self.prefix_tokens} and ttmm.doc_tokens={self.doc_tokens} must be >= 1")
    _check(self.embedder == "base" or self.embedder.startswith("hf:"),
           f"ttmm.embedder={self.embedder!r} unknown; choose base or hf:<dir>")
    _check(self.max_docs >= 0, f"ttmm.max_docs={self.max_docs} must be >= 0")


def _tower(**kw) -> ModelConfig:
  base = dict(vocab_size=1, d_model=64, num_layers=2, num_heads=4, d_ff=256, activation="gelu", norm="layer",
              bias=True, norm_eps=1e-5, max_seq_len=64, tie_embeddings=True)
  base.update(kw)
  return ModelConfig(**base)


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """Two-tower contrastive model (CLIP / SigLIP). Each tower is a `ModelConfig`, so the same dense|MoE layer
  pattern, MoE options and upcycling rules apply to both; `vision.vocab_size` is unused."""

  vision: ModelConfig = _tower()
  text: ModelConfig = _tower(vocab_size=256, max_seq_len=32)
  image_size: int = 32
  patch_size: int = 4
  channels: int = 3
  pool: str = "cls"  # cls | mean (vision); the text tower pools at the end-of-text token
  embed_dim: int = 64  # joint embedding width
  loss: str = "softmax"  # softmax (CLIP) | sigmoid (SigLIP)
  init_temperature: float = 0.07
  init_bias: float = -10.0  # SigLIP
  shared_backbone: bool = False  # one backbone for both modalities (LIMoE-style)
  pre_norm: bool = True  # LayerNorm on the patch embeddings before the blocks (OpenAI CLIP's "pre_layrnorm")
  text_causal: bool = True  # OpenAI CLIP's text tower is causal
  # Text pooling: "eos" = the first `eos_id` token (captions are encoded + EOS, padded with EOS);
  # "argmax" = the highest token id (OpenAI CLIP, whose end-of-text id is the largest in its vocab).
  text_pool: str = "eos"
  eos_id: int = 0  # the tokenizer's end-of-text id (the byte tokenizer's is 0); also the padding
  # Data: feature names in the TFDS set ("/" walks nested features: "captions/text" in coco_captions; a list of
  # captions per image is fine). label_key = "" -> no labels, no zero-shot eval.
  image_key: str = "image"
  caption_key: str = "caption"
  label_key: str = "label"
  image_mean: tuple[float, ...] = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's; per channel, or 1 value
  image_std: tuple[float, ...] = (0.26862954, 0.26130258, 0.27577711)
  augment_shift: int = 0  # train split: random translation by up to this many pixels (edge padding)
  augment_flip: bool = False  # train split: random horizontal flip (off: captions may say "left"/"right")
  augment_noise: float = 0.0  # train split: Gaussian pixel noise std, in [0, 1] pixel units
  # Zero-shot classification: class names (() -> the label feature's ClassLabel names) and prompt templates
  # ("{}" = the class name); the class embedding is the normalized mean over templates (Radford et al. 2021).
  class_names: tuple[str, ...] = ()
  zeroshot_templates: tuple[str, ...] = ("a photo of a {}.",)
  eval_examples: int = 0  # retrieval / zero-shot eval on the first N validation images (0 = all)

  def __post_init__(self):
    _check(self.image_size > 0 and self.patch_size > 0 and self.channels > 0 and self.embed_dim > 0,
           f"clip.image_size={self.image_size}, clip.patch_size={self.patch_size}, clip.channels={self.channels} and "
           f"clip.embed_dim={self.embed_dim} must be > 0")
    _check(self.image_size % self.patch_size == 0,
           f"clip.image_size={self.image_size} is not divisible by clip.patch_size={self.patch_size}")
    _check(self.pool in ("cls", "mean"), f"clip.pool={self.pool!r}: choose cls or mean")
    _check(self.loss in ("softmax", "sigmoid"), f"clip.loss={self.loss!r}: choose softmax or sigmoid")
    _check(self.text_pool in ("eos", "argmax"), f"clip.text_pool={self.text_pool!r}: choose eos or argmax")
    _check(0 <= self.eos_id < self.text.vocab_size,
           f"clip.eos_id={self.eos_id} must be in [0, clip.text.vocab_size={self.text.vocab_size})")
    _check(len(self.image_mean) in (1, self.channels) and len(self.image_std) in (1, self.channels),
           f"clip.image_mean={self.image_mean} and clip.image_std={self.image_std} need 1 or clip.channels="
           f"{self.channels} values each")
    _check(all(s > 0 for s in self.image_std), f"clip.image_std={self.image_std} must be > 0")
    _check(self.augment_shift >= 0 and self.augment_noise >= 0 and self.eval_examples >= 0,
           "clip.augment_shift, clip.augment_noise and clip.eval_examples must be >= 0")
    _check(all("{}" in t for t in self.zeroshot_templates),
           f"clip.zeroshot_templates={self.zeroshot_templates}: each needs a '{{}}' for the class name")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
  name: str = "unnamed"
  task: str = "lm"  # lm | clip
  model: ModelConfig = ModelConfig()
  data: DataConfig = DataConfig()
  optim: OptimConfig = OptimConfig()
  train: TrainConfig = TrainConfig()
  mesh: MeshConfig = MeshConfig()
  init: UpcycleConfig = UpcycleConfig()
  clip: ClipConfig = ClipConfig()  # used when task == "clip"
  peft: PeftConfig = PeftConfig()  # fine-tuning a frozen base (see moejax/peft)
  ttmm: TtmmConfig = TtmmConfig()  # test-time merging of LoRA experts (see moejax/ttmm)

  def __post_init__(self):
    _check(self.task in ("lm", "clip"), f"task={self.task!r} unknown; choose 'lm' or 'clip'")
    # A decoder must not see the future: its router must be causal (the router table says which are).
    r = routers.get(self.model.moe.router)
    _check(self.task != "lm" or not self.model.moe.num_experts or r.causal,
           f"model.moe.router={r.name!r} is not causal: {r.not_causal}, so a decoder's earlier outputs would "
           f"depend on later tokens; a causal LM (task='lm') needs a causal router: {routers.causal_names()} (the "
           f"others are for encoders, e.g. clip.vision.moe.router)")


# ----------------------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------------------


def _field_names(dc: Any) -> list[str]:
  return [f.name for f in dataclasses.fields(dc)]


def _all_paths(dc: Any, prefix: str = "") -> list[str]:
  out = []
  for f in dataclasses.fields(dc):
    v = getattr(dc, f.name)
    p = f"{prefix}{f.name}"
    out.append(p)
    if dataclasses.is_dataclass(v):
      out.extend(_all_paths(v, p + "."))
  return out


def _suggest(key: str, root: Any) -> str:
  close = difflib.get_close_matches(key, _all_paths(root), n=1, cutoff=0.6)
  return f"; did you mean {close[0]!r}?" if close else ""


def _coerce(value: Any, tp: Any, key: str) -> Any:
  """Check `value` against the annotation `tp`, converting the harmless cases (int -> float, list -> tuple)."""
  origin = typing.get_origin(tp)
  args = typing.get_args(tp)
  if tp is Any:
    return value
  if origin in (typing.Union, types.UnionType):
    for a in args:
      try:
        return _coerce(value, a, key)
      except ConfigError:
        pass
    raise ConfigError(f"{key}: {value!r} is not a {tp}")
  if tp is type(None):
    if value is None:
      return None
    raise ConfigError(f"{key}: expected None, got {value!r}")
  if origin is tuple:
    if isinstance(value, Mapping) and len(args) == 2 and typing.get_origin(args[0]) is tuple:
      value = list(value.items())  # {"name": weight} for a tuple of pairs (data.mixture)
    if not isinstance(value, (list, tuple)):
      raise ConfigError(f"{key}: expected a tuple, got {type(value).__name__} {value!r}")
    if len(args) == 2 and args[1] is Ellipsis:
      return tuple(_coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
    if args and len(args) != len(value):
      raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
    return tuple(_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))) if args else tuple(value)
  if tp is float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ConfigError(f"{key}: expected float, got {type(value).__name__} {value!r}")
    _check_number(float(value) if isinstance(value, float) else value, key)
    return float(value)
  if tp is int:
    if isinstance(value, bool) or not isinstance(value, int):
      raise ConfigError(f"{key}: expected int, got {type(value).__name__} {value!r}")
    _check_number(value, key)
    return value
  if tp is bool:
    if not isinstance(value, bool):
      raise ConfigError(f"{key}: expected bool (True/False), got {type(value).__name__} {value!r}")
    return value
  if tp is str:
    if not isinstance(value, str):
      raise ConfigError(f"{key}: expected str, got {type(value).__name__} {value!r}")
    return value
  if dataclasses.is_dataclass(tp):
    if isinstance(value, tp):
      return value
    if isinstance(value, Mapping):
      return from_dict(tp, value, prefix=key + ".")
    raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
  return value


def _check_number(value: Any, key: str) -> None:
  """Every number in a config is finite and fits the int32 the trainer counts steps in: `optim.lr=1e999` parses
  to inf and `train.steps=10**30` to an int no step counter holds."""
  if isinstance(value, bool):
    return
  if isinstance(value, float) and not math.isfinite(value):
    raise ConfigError(f"{key}={value!r} is not a finite number")
  if isinstance(value, int) and not INT_MIN <= value <= INT_MAX:
    raise ConfigError(f"{key}={value} is out of range: integers in a config must lie in [{INT_MIN}, {INT_MAX}]")
  if isinstance(value, (tuple, list)):
    for i, v in enumerate(value):
      _check_number(v, f"{key}[{i}]")


INT_MIN, INT_MAX = -(2**31), 2**31 - 1


def _replace_unchecked(dc: Any, **changes: Any) -> Any:
  """`dataclasses.replace` without `__post_init__`: overrides are applied together and validated once after
  (`validate`), so their order never matters (`moe.every=1 moe.offset=0` is fine either way)."""
  new = copy.copy(dc)
  for k, v in changes.items():
    object.__setattr__(new, k, v)
  return new


def _set_path(root: Any, dotted: str, value: Any, full_key: str | None = None) -> Any:
  full_key = full_key or dotted
  head, _, rest = dotted.partition(".")
  if not dataclasses.is_dataclass(root) or head not in _field_names(root):
    raise ConfigError(f"unknown key {full_key!r}{_suggest(full_key, _ROOT.get('cfg', root))}")
  hints = typing.get_type_hints(type(root))
  if rest:
    child = getattr(root, head)
    if not dataclasses.is_dataclass(child):
      raise ConfigError(f"unknown key {full_key!r}: {head!r} is a {type(child).__name__}, not a section")
    new_child = _set_path(child, rest, value, full_key)
  else:
    new_child = _coerce(value, hints[head], full_key)
  return _replace_unchecked(root, **{head: new_child})


_ROOT: dict[str, Any] = {}  # the top-level config while an override is applied, for "did you mean" over all keys


def validate(cfg: Any, overrides: Mapping[str, Any] | None = None, prefix: str = "") -> None:
  """Check a whole config tree: every number finite and in range, then each section's `__post_init__`
  (children first, as construction does). A failing section's message is prefixed with the overrides that
  touched it (`model.moe.top_k=9: ...`)."""
  overrides = overrides or {}
  for f in dataclasses.fields(cfg):
    v = getattr(cfg, f.name)
    if dataclasses.is_dataclass(v):
      validate(v, overrides, f"{prefix}{f.name}.")
    else:
      _check_number(v, prefix + f.name)
  post = getattr(type(cfg), "__post_init__", None)
  if post is None:
    return
  touched = [k for k in overrides if k.startswith(prefix) and (prefix or "." not in k)]
  blame = ", ".join(f"{k}={overrides[k]!r}" for k in touched)
  try:
    post(cfg)
  except ConfigError as e:
    raise ConfigError(f"{blame}: {e}" if blame else str(e)) from None
  except (ArithmeticError, TypeError, ValueError) as e:  # e.g. a division by a size set to 0
    where = blame or prefix.rstrip(".") or "config"
    raise ConfigError(f"{where}: invalid ({type(e).__name__}: {e})") from None


def derive(base: ExperimentConfig, overrides: Mapping[str, Any]) -> ExperimentConfig:
  """A new config with `{"a.b.c": value}` applied (the same path the CLI takes), then validated once."""
  cfg = base
  for key, value in overrides.items():
    _ROOT["cfg"] = base
    try:
      cfg = _set_path(cfg, key, value)
    finally:
      _ROOT.clear()
  validate(cfg, overrides)
  return cfg


def parse_override(text: str) -> tuple[str, Any]:
  """`"a.b=3"` -> `("a.b", 3)`. Values are Python literals (`ast.literal_eval`); bare words are strings."""
  if "=" not in text:
    raise ConfigError(f"override {text!r} must look like key=value (e.g. train.steps=100)")
  key, _, raw = text.partition("=")
  key, raw = key.strip(), raw.strip()
  if not key:
    raise ConfigError(f"override {text!r} has no key")
  try:
    value = ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    if raw in ("true", "false"):
      value = raw == "true"
    elif raw.lower() in ("none", "null"):
      value = None
    else:
      value = raw  # bare words are strings: model.activation=gelu
  return key, value


def apply_overrides(base: ExperimentConfig, overrides: Sequence[str]) -> ExperimentConfig:
  return derive(base, dict(parse_override(o) for o in overrides))


# ----------------------------------------------------------------------------------------------------------
# Serialization (JSON, never pickle)
# ----------------------------------------------------------------------------------------------------------


def to_dict(cfg: Any) -> dict[str, Any]:
  return dataclasses.asdict(cfg)


def to_json(cfg: Any) -> str:
  return json.dumps(to_dict(cfg), indent=2, sort_keys=False)


def from_dict(cls: type, data: Mapping[str, Any], prefix: str = "") -> Any:
  """Rebuild a config from `to_dict` output, with the same type checks and unknown-key errors as overrides."""
  if not isinstance(data, Mapping):
    raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a JSON object, got {type(data).__name__}")
  hints = typing.get_type_hints(cls)
  names = set(_field_names(cls))
  kwargs = {}
  for k, v in data.items():
    if k not in names:
      close = difflib.get_close_matches(k, sorted(names), n=1)
      hint = f"; did you mean {prefix}{close[0]!r}?" if close else ""
      raise ConfigError(f"unknown key {prefix + k!r}{hint}")
    kwargs[k] = _coerce(v, hints[k], prefix + k)
  try:
    return cls(**kwargs)
  except ConfigError:
    raise
  except (ArithmeticError, TypeError, ValueError) as e:
    raise ConfigError(f"{prefix.rstrip('.') or 'config'}: invalid ({type(e).__name__}: {e})") from None


def from_json(text: str) -> ExperimentConfig:
  return from_dict(ExperimentConfig, json.loads(text))
