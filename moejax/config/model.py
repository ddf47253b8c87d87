"""What is trained: the decoder (its MoE layers and RoPE) and the CLIP towers."""

from __future__ import annotations

import dataclasses
import difflib

from moejax import routers
from moejax.config.base import ConfigError, check


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
    check(self.num_experts >= 0, f"moe.num_experts must be >= 0, got {self.num_experts}")
    if self.num_experts:
      check(1 <= self.top_k <= self.num_experts,
            f"moe.top_k={self.top_k} must be in [1, moe.num_experts={self.num_experts}]")
    if self.router not in routers.TABLE:
      close = difflib.get_close_matches(self.router, routers.names(), n=1)
      raise ConfigError(f"moe.router={self.router!r} unknown{f'; did you mean {close[0]!r}?' if close else ''} "
                        f"(routers: {', '.join(routers.names())}; they register in moejax/routers.py)")
    check(self.dispatch in ("dropless", "capacity"),
          f"moe.dispatch={self.dispatch!r} unknown; choose 'dropless' or 'capacity'")
    check(self.gmm_backend in ("auto", "ragged_dot", "sorted", "dense", "megablox"),
          f"moe.gmm_backend={self.gmm_backend!r} unknown; choose auto, ragged_dot, sorted, dense or megablox")
    check(self.capacity_factor > 0, f"moe.capacity_factor must be > 0, got {self.capacity_factor}")
    check(self.ep_exchange in ("fixed", "ragged"), f"moe.ep_exchange={self.ep_exchange!r}: choose fixed or ragged")
    check(self.ep_buffer_factor >= 0, f"moe.ep_buffer_factor={self.ep_buffer_factor} must be >= 0 (0 = never drop)")
    token_picks = routers.get(self.router).token_picks
    check(self.ep_exchange != "ragged" or (self.dispatch == "dropless" and token_picks),
          f"moe.ep_exchange='ragged' needs moe.dispatch='dropless' and a token-choice router (got "
          f"{self.dispatch!r}, {self.router!r}); capacity and expert-choice layouts are fixed-size already")
    check(self.every >= 1 and 0 <= self.offset < self.every,
          f"moe.every={self.every}, moe.offset={self.offset}: need every >= 1 and 0 <= offset < every")
    check(self.d_ff >= 0 and self.jitter >= 0 and self.num_shared_experts >= 0,
          "moe.d_ff, moe.jitter and moe.num_shared_experts must be >= 0")
    check(self.router_map_from == 0 or (self.num_experts and token_picks),
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
    check(self.type in ("none", "linear", "llama3"),
          f"model.rope_scaling.type={self.type!r}: choose none, linear or llama3")
    check(self.factor > 0, f"model.rope_scaling.factor={self.factor} must be > 0")
    if self.type == "llama3":
      check(0 < self.low_freq_factor < self.high_freq_factor,
            f"model.rope_scaling: need 0 < low_freq_factor ({self.low_freq_factor}) < high_freq_factor "
            f"({self.high_freq_factor})")
      check(self.original_max_seq_len > 0,
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
    check(self.d_model > 0 and self.num_layers > 0 and self.num_heads > 0 and self.d_ff > 0,
          f"model: d_model, num_layers, num_heads, d_ff must be > 0, got {self}")
    check(self.kv_heads > 0 and self.num_heads % self.kv_heads == 0,
          f"model.num_heads={self.num_heads} must be a multiple of model.num_kv_heads={self.kv_heads}")
    if not self.head_dim:
      check(self.d_model % self.num_heads == 0,
            f"model.d_model={self.d_model} is not divisible by model.num_heads={self.num_heads}; set model.head_dim")
    check(self.activation in ("swiglu", "gelu", "gelu_tanh", "quick_gelu"),
          f"model.activation={self.activation!r}: choose swiglu, gelu, gelu_tanh or quick_gelu")
    check(self.norm in ("rms", "layer"), f"model.norm={self.norm!r}: choose rms or layer")
    for f in ("param_dtype", "compute_dtype"):
      v = getattr(self, f)
      check(v in ("float32", "bfloat16", "float16"), f"model.{f}={v!r}: choose float32, bfloat16 or float16")
    check(self.remat_policy in ("full", "dots", "dots_no_batch", "save_moe"),
          f"model.remat_policy={self.remat_policy!r}: choose full, dots, dots_no_batch or save_moe")
    check(self.attention_impl in ("auto", "xla", "cudnn", "einsum"),
          f"model.attention_impl={self.attention_impl!r}: choose auto, xla, cudnn or einsum")
    for i in self.moe.layers:
      check(0 <= i < self.num_layers, f"model.moe.layers has {i}, outside [0, model.num_layers={self.num_layers})")

  @property
  def kv_heads(self) -> int:
    return self.num_kv_heads or self.num_heads

  @property
  def dim_per_head(self) -> int:
    return self.head_dim or self.d_model // self.num_heads

  @property
  def expert_d_ff(self) -> int:
    return self.moe.d_ff or self.d_ff


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
    check(self.image_size > 0 and self.patch_size > 0 and self.channels > 0 and self.embed_dim > 0,
          f"clip.image_size={self.image_size}, clip.patch_size={self.patch_size}, clip.channels={self.channels} and "
          f"clip.embed_dim={self.embed_dim} must be > 0")
    check(self.image_size % self.patch_size == 0,
          f"clip.image_size={self.image_size} is not divisible by clip.patch_size={self.patch_size}")
    check(self.pool in ("cls", "mean"), f"clip.pool={self.pool!r}: choose cls or mean")
    check(self.loss in ("softmax", "sigmoid"), f"clip.loss={self.loss!r}: choose softmax or sigmoid")
    check(self.text_pool in ("eos", "argmax"), f"clip.text_pool={self.text_pool!r}: choose eos or argmax")
    check(0 <= self.eos_id < self.text.vocab_size,
          f"clip.eos_id={self.eos_id} must be in [0, clip.text.vocab_size={self.text.vocab_size})")
    check(len(self.image_mean) in (1, self.channels) and len(self.image_std) in (1, self.channels),
          f"clip.image_mean={self.image_mean} and clip.image_std={self.image_std} need 1 or clip.channels="
          f"{self.channels} values each")
    check(all(s > 0 for s in self.image_std), f"clip.image_std={self.image_std} must be > 0")
    check(self.augment_shift >= 0 and self.augment_noise >= 0 and self.eval_examples >= 0,
          "clip.augment_shift, clip.augment_noise and clip.eval_examples must be >= 0")
    check(all("{}" in t for t in self.zeroshot_templates),
          f"clip.zeroshot_templates={self.zeroshot_templates}: each needs a '{{}}' for the class name")
