"""Decoder LMs <-> Hugging Face: Llama, Mistral, Qwen2 (dense), Mixtral and Qwen2-MoE (MoE).

Two things live here: the config translation (`config_from_hf`, `config_to_hf`) and the tensor plan (`plan`),
one `Entry` per moejax param that names its HF tensor(s) and how the layouts relate. Import and export both
walk the same plan, so the two directions cannot drift apart. HF linears store `weight` as [out, in] with
`y = x @ weight.T`; moejax stores [in..., out...] (`wq` [D, H, K], `wo` [H, K, D]), so a linear is a transpose
plus a reshape, and RoPE needs no permutation because both use the split-halves ("rotate_half") layout.

Reading and writing files is `interop/hf.py`'s job; nothing here touches the disk or needs torch.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from moejax import config, routers

DENSE_ARCHS = ("llama", "mistral", "qwen2")
MOE_ARCHS = ("mixtral", "qwen2_moe")
ARCHS = DENSE_ARCHS + MOE_ARCHS
EXPORT_ARCHS = ("llama", "qwen2", "mixtral", "qwen2_moe")
_CLASS = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
          "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM"}
# Values transformers' config classes use when config.json leaves a key out.
_DEFAULTS = {
  "llama": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 2048},
  "mistral": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 131072},
  "qwen2": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
  "mixtral": {"rope_theta": 1e6, "rms_norm_eps": 1e-5, "max_position_embeddings": 131072},
  "qwen2_moe": {"rope_theta": 10000.0, "rms_norm_eps": 1e-6, "max_position_embeddings": 32768},
}


def _unsupported(arch: str, feature: str, why: str = "") -> config.ConfigError:
  return config.ConfigError(f"{arch} checkpoint uses {feature}, which moejax does not support{why}")


# ----------------------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------------------


def _rope(hf: dict, arch: str) -> tuple[float, config.RopeScalingConfig]:
  """RoPE base and scaling from either spelling: transformers 5's `rope_parameters`, or 4.x's `rope_theta` +
  `rope_scaling`. Plain, linear and Llama-3 ("llama3") RoPE map to moejax; other scalings are an error."""
  scaling = hf.get("rope_scaling") or {}
  rp = {**(hf.get("rope_parameters") or {}), **scaling}
  rope_type = (scaling.get("rope_type") or scaling.get("type") or rp.get("rope_type") or rp.get("type")
               or "default")
  for d in (rp, hf):
    prf = d.get("partial_rotary_factor", 1.0)
    if prf not in (None, 1, 1.0):
      raise _unsupported(arch, f"partial_rotary_factor={prf}")
  theta = float(rp.get("rope_theta", hf.get("rope_theta", _DEFAULTS[arch]["rope_theta"])))
  if rope_type == "default":
    return theta, config.RopeScalingConfig()
  if rope_type == "linear":
    return theta, config.RopeScalingConfig(type="linear", factor=float(rp["factor"]))
  if rope_type == "llama3":
    return theta, config.RopeScalingConfig(
      type="llama3", factor=float(rp["factor"]), low_freq_factor=float(rp.get("low_freq_factor", 1.0)),
      high_freq_factor=float(rp.get("high_freq_factor", 4.0)),
      original_max_seq_len=int(rp.get("original_max_position_embeddings", 8192)))
  raise _unsupported(arch, f"rope scaling (rope_type={rope_type!r})",
                     "; plain, linear and llama3 RoPE are implemented (layers/attention.py)")


def _rope_to_hf(cfg: config.ModelConfig) -> dict[str, Any]:
  """`rope_parameters` (transformers >= 5) for cfg's RoPE; 4.x reads `rope_theta` and `rope_scaling`."""
  sc = cfg.rope_scaling
  if sc.type == "none":
    return {"rope_type": "default", "rope_theta": cfg.rope_theta}
  out = {"rope_type": sc.type, "rope_theta": cfg.rope_theta, "factor": sc.factor}
  if sc.type == "llama3":
    out.update(low_freq_factor=sc.low_freq_factor, high_freq_factor=sc.high_freq_factor,
               original_max_position_embeddings=sc.original_max_seq_len)
  return out


def _sliding_window(hf: dict, arch: str) -> int | None:
  """The attention window if the checkpoint really uses one, else None."""
  window = hf.get("sliding_window")
  if not window:
    return None
  if arch.startswith("qwen2"):
    types = hf.get("layer_types")
    used = "sliding_attention" in types if types else bool(hf.get("use_sliding_window"))
    return int(window) if used else None
  return int(window)


# Aux-loss semantics differ (see router.aux_from_stats and docs/architecture.md, "Aux losses"): moejax sums one
# load-balance term per MoE layer, 1.0 at balance; transformers' Mixtral / Qwen2-MoE form one term over all MoE
# layers' tokens pooled, k (top_k) at balance, and add router_aux_loss_coef times it (when output_router_logits
# is on). Equal pressure: weight * L * 1 = coef * k at balance, so weight = coef * k / L; for one MoE layer the
# two losses are then equal exactly. transformers has no router z-loss: imports get z_loss_weight = 0.
def aux_weight_from_hf(coef: float, top_k: int, num_moe_layers: int) -> float:
  """transformers' router_aux_loss_coef -> moejax moe.load_balance_weight (same pressure)."""
  return coef * top_k / max(num_moe_layers, 1)


def aux_coef_to_hf(weight: float, top_k: int, num_moe_layers: int) -> float:
  """moejax moe.load_balance_weight -> transformers' router_aux_loss_coef (the inverse of aux_weight_from_hf)."""
  return weight * max(num_moe_layers, 1) / top_k


def config_from_hf(hf: dict, *, param_dtype: str = "float32",
                   max_seq_len: int | None = None) -> config.ModelConfig:
  """config.json (as a dict) -> ModelConfig. `max_seq_len` caps the context; a checkpoint trained with
  sliding-window attention imports only with `max_seq_len <= window`, where full causal attention is exactly
  the same."""
  arch = hf.get("model_type")
  if arch not in ARCHS:
    raise config.ConfigError(f"unsupported architecture model_type={arch!r} (architectures="
                             f"{hf.get('architectures')}); supported: {', '.join(ARCHS)} and clip")
  need = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
  missing = [k for k in need if k not in hf]
  if missing:
    raise config.ConfigError(f"{arch} config.json lacks {missing}")
  if hf.get("hidden_act", "silu") != "silu":
    raise _unsupported(arch, f"hidden_act={hf['hidden_act']!r}",
                       "; only SiLU-gated MLPs (SwiGLU) map to moejax")
  for flag in ("attention_bias", "mlp_bias"):
    if hf.get(flag):
      raise _unsupported(arch, f"{flag}=True")
  theta, rope_scaling = _rope(hf, arch)
  max_pos = int(hf.get("max_position_embeddings") or _DEFAULTS[arch]["max_position_embeddings"])
  window = _sliding_window(hf, arch)
  if window is not None and window < max_pos and (max_seq_len is None or max_seq_len > window):
    raise _unsupported(arch, f"sliding_window={window}",
                       f"; import with max_seq_len<={window} (full attention over at most {window} tokens is "
                       "exactly the sliding-window model)")
  D, H = int(hf["hidden_size"]), int(hf["num_attention_heads"])
  head_dim = int(hf.get("head_dim") or D // H)
  moe = config.MoEConfig()
  d_ff = int(hf["intermediate_size"])
  if arch == "mixtral":
    k, L = int(hf["num_experts_per_tok"]), int(hf["num_hidden_layers"])
    moe = config.MoEConfig(num_experts=int(hf["num_local_experts"]), top_k=k,
                           every=1, offset=0, renormalize=True, dispatch="dropless",
                           jitter=float(hf.get("router_jitter_noise") or 0.0), z_loss_weight=0.0,
                           load_balance_weight=aux_weight_from_hf(float(hf.get("router_aux_loss_coef", 0.001)), k, L))
  elif arch == "qwen2_moe" and int(hf.get("num_experts", 0)) > 0:
    L, step = int(hf["num_hidden_layers"]), int(hf.get("decoder_sparse_step", 1))
    dense = set(hf.get("mlp_only_layers") or ())
    sparse = tuple(i for i in range(L) if i not in dense and (i + 1) % step == 0)
    pattern = {"every": step, "offset": step - 1}
    if sparse != tuple(i for i in range(L) if i % step == step - 1):
      pattern = {"layers": sparse}
    shared = int(hf.get("shared_expert_intermediate_size") or 0)
    if sparse:
      k = int(hf["num_experts_per_tok"])
      moe = config.MoEConfig(num_experts=int(hf["num_experts"]), top_k=k,
                             d_ff=int(hf["moe_intermediate_size"]),
                             renormalize=bool(hf.get("norm_topk_prob")),
                             dispatch="dropless", num_shared_experts=1 if shared else 0, shared_d_ff=shared,
                             shared_gate=bool(shared),
                             z_loss_weight=0.0, **pattern,
                             load_balance_weight=aux_weight_from_hf(float(hf.get("router_aux_loss_coef", 0.001)),
                                                                    k, len(sparse)))
  qkv_bias = arch == "qwen2" or (arch == "qwen2_moe" and bool(hf.get("qkv_bias", True)))
  return config.ModelConfig(
    vocab_size=int(hf["vocab_size"]), d_model=D, num_layers=int(hf["num_hidden_layers"]), num_heads=H,
    num_kv_heads=int(hf.get("num_key_value_heads") or H), head_dim=0 if head_dim * H == D else head_dim,
    d_ff=d_ff, activation="swiglu", max_seq_len=min(max_pos, max_seq_len or max_pos), rope_theta=theta,
    rope_scaling=rope_scaling,
    norm_eps=float(hf.get("rms_norm_eps", _DEFAULTS[arch]["rms_norm_eps"])),
    tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=qkv_bias, norm="rms",
    param_dtype=param_dtype, compute_dtype=param_dtype, moe=moe)


def export_arch(cfg: config.ModelConfig, arch: str = "auto") -> str:
  """Pick (auto) or check the HF architecture that holds `cfg` exactly; errors name what does not fit."""
  if arch not in ("auto",) + EXPORT_ARCHS:
    raise ValueError(f"arch={arch!r}: choose auto, {', '.join(EXPORT_ARCHS)}")
  problems = []
  if cfg.activation != "swiglu":
    problems.append(f"model.activation={cfg.activation!r} (HF decoders here are SwiGLU)")
  if cfg.norm != "rms":
    problems.append(f"model.norm={cfg.norm!r} (needs rms)")
  if cfg.bias:
    problems.append("model.bias=True")
  m = cfg.moe
  if m.num_experts and not routers.get(m.router).hf:  # the router table says what HF can hold
    problems.append(f"moe.router={m.router!r} ({routers.get(m.router).no_hf})")
  if m.router_map_from:
    problems.append(f"moe.router_map_from={m.router_map_from}: a merged (EEP) model maps its router's "
                    f"{m.router_map_from} expert probabilities onto {m.num_experts} experts (router/map), which HF "
                    "routers cannot hold; only a pure pruning (`moejax prune` with a selection) exports")
  if problems:
    raise config.ConfigError("cannot export to Hugging Face: " + "; ".join(problems))
  moe_layers = [i for i in range(cfg.num_layers) if m.is_moe_layer(i)]
  if arch == "auto":
    if not moe_layers:
      arch = "qwen2" if cfg.qkv_bias else "llama"
    elif (len(moe_layers) == cfg.num_layers and not m.num_shared_experts and m.renormalize
          and not cfg.qkv_bias):
      arch = "mixtral"
    else:
      arch = "qwen2_moe"
  why = []
  if arch in DENSE_ARCHS and moe_layers:
    why.append(f"it has MoE layers {moe_layers}; use mixtral or qwen2_moe")
  if arch == "llama" and cfg.qkv_bias:
    why.append("model.qkv_bias=True; use qwen2")
  if arch in MOE_ARCHS and not moe_layers:
    why.append("it has no MoE layers; use llama or qwen2")
  if arch == "mixtral":
    if moe_layers and len(moe_layers) != cfg.num_layers:
      why.append(f"Mixtral makes every layer MoE but moejax has MoE layers {moe_layers} of {cfg.num_layers}; "
                 "use qwen2_moe")
    if m.num_shared_experts:
      why.append("moe.num_shared_experts > 0; use qwen2_moe")
    if not m.renormalize:
      why.append("moe.renormalize=False (Mixtral renormalizes top-k); use qwen2_moe")
    if cfg.qkv_bias:
      why.append("model.qkv_bias=True; use qwen2_moe")
  if why:
    raise config.ConfigError(f"cannot export as {arch}: " + "; ".join(why))
  return arch


def config_to_hf(cfg: config.ModelConfig, arch: str, dtype: str = "float32",
                 shared_width: int = 0) -> dict[str, Any]:
  """ModelConfig -> config.json dict for `arch` (already checked by `export_arch`). `shared_width`: the shared
  expert's hidden width as the params have it (0 = no shared expert)."""
  m = cfg.moe
  n_moe = sum(m.is_moe_layer(i) for i in range(cfg.num_layers))
  out: dict[str, Any] = {
    "architectures": [_CLASS[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
    "hidden_size": cfg.d_model, "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
    "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.dim_per_head, "intermediate_size": cfg.d_ff,
    "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
    "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": 0.02, "attention_dropout": 0.0,
    # Both spellings of RoPE: transformers >= 5 reads rope_parameters, 4.x rope_theta and rope_scaling.
    "rope_theta": cfg.rope_theta, "rope_parameters": _rope_to_hf(cfg),
    "use_cache": True, "dtype": dtype, "torch_dtype": dtype,
  }
  if cfg.rope_scaling.type != "none":
    out["rope_scaling"] = {k: v for k, v in out["rope_parameters"].items() if k != "rope_theta"}
  if arch == "llama":
    out.update(attention_bias=False, mlp_bias=False)
  if arch in ("qwen2", "qwen2_moe"):
    out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.num_layers,
               layer_types=["full_attention"] * cfg.num_layers)
  if arch == "mixtral":
    out.update(num_local_experts=m.num_experts, num_experts_per_tok=m.top_k,
               intermediate_size=cfg.expert_d_ff, sliding_window=None, router_jitter_noise=m.jitter,
               router_aux_loss_coef=aux_coef_to_hf(m.load_balance_weight, m.top_k, n_moe),
               output_router_logits=False)
  if arch == "qwen2_moe":
    out.update(num_experts=m.num_experts, num_experts_per_tok=m.top_k, moe_intermediate_size=cfg.expert_d_ff,
               norm_topk_prob=m.renormalize, decoder_sparse_step=1,
               mlp_only_layers=[i for i in range(cfg.num_layers) if not m.is_moe_layer(i)],
               # Qwen2-MoE always has a shared expert; without one we write a width-1 expert of zeros.
               shared_expert_intermediate_size=shared_width or 1, qkv_bias=True,
               router_aux_loss_coef=aux_coef_to_hf(m.load_balance_weight, m.top_k, n_moe),
               output_router_logits=False)
  return out


# ----------------------------------------------------------------------------------------------------------
# The tensor plan
# ----------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
  """How one moejax param is stored in HF.

  `hf`: one tensor name, or one per expert (stacked along moejax axis 0). `kind`: "copy" (same layout),
  "flat" (HF keeps it 1-D, e.g. q/k/v biases [H*K] vs moejax [H, K]), or "linear" (HF [out, in]; the first
  `n_in` moejax axes are `in`).
  """

  path: str
  hf: tuple[str, ...]
  kind: str
  n_in: int = 1
  stacked: bool = False

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape of each HF tensor, given the moejax shape."""
    s = shape[1:] if self.stacked else shape
    if self.kind == "copy":
      return tuple(s)
    if self.kind == "flat":
      return (math.prod(s),)
    return (math.prod(s[self.n_in:]), math.prod(s[:self.n_in]))

  def to_moejax(self, ws: list[np.ndarray], shape: tuple[int, ...]) -> np.ndarray:
    s = shape[1:] if self.stacked else shape
    one = (lambda w: w) if self.kind == "copy" else (lambda w: w.reshape(s)) if self.kind == "flat" \
      else (lambda w: w.T.reshape(s))
    return np.stack([one(w) for w in ws]) if self.stacked else one(ws[0])

  def to_hf(self, x: np.ndarray) -> list[np.ndarray]:
    def one(w):
      if self.kind == "copy":
        return w
      if self.kind == "flat":
        return w.reshape(-1)
      return np.ascontiguousarray(w.reshape(math.prod(w.shape[:self.n_in]), -1).T)

    return [one(w) for w in x] if self.stacked else [one(x)]


_ATTN = {"wq": ("q_proj.weight", "linear", 1), "wk": ("k_proj.weight", "linear", 1),
         "wv": ("v_proj.weight", "linear", 1), "wo": ("o_proj.weight", "linear", 2),
         "bq": ("q_proj.bias", "flat", 0), "bk": ("k_proj.bias", "flat", 0), "bv": ("v_proj.bias", "flat", 0)}
_PROJ = {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"}
_MIXTRAL_EXPERT = {"w_gate": "w1", "w_down": "w2", "w_up": "w3"}  # Mixtral's own names (Jiang et al. 2024)


def _layer_entry(path: str, i: int, rest: str, arch: str, num_experts: int) -> Entry | None:
  pre = f"model.layers.{i}."
  moe_pre = pre + ("block_sparse_moe." if arch == "mixtral" else "mlp.")
  if rest == "attn_norm/scale":
    return Entry(path, (pre + "input_layernorm.weight",), "copy")
  if rest == "mlp_norm/scale":
    return Entry(path, (pre + "post_attention_layernorm.weight",), "copy")
  group, _, name = rest.partition("/")
  if group == "attn" and name in _ATTN:
    hf, kind, n_in = _ATTN[name]
    return Entry(path, (pre + "self_attn." + hf,), kind, n_in)
  if group == "mlp" and name in _PROJ:
    return Entry(path, (pre + f"mlp.{_PROJ[name]}.weight",), "linear")
  if rest == "moe/router/w":
    return Entry(path, (moe_pre + "gate.weight",), "linear")
  m = re.fullmatch(r"moe/experts/(w_gate|w_up|w_down)", rest)
  if m:
    proj = _MIXTRAL_EXPERT[m[1]] if arch == "mixtral" else _PROJ[m[1]]
    return Entry(path, tuple(f"{moe_pre}experts.{e}.{proj}.weight" for e in range(num_experts)), "linear",
                 stacked=True)
  m = re.fullmatch(r"moe/shared/(w_gate|w_up|w_down)", rest)
  if m and arch == "qwen2_moe":
    return Entry(path, (f"{moe_pre}shared_expert.{_PROJ[m[1]]}.weight",), "linear")
  if rest == "moe/shared_gate/w" and arch == "qwen2_moe":
    return Entry(path, (moe_pre + "shared_expert_gate.weight",), "linear")
  return None


def plan(cfg: config.ModelConfig, arch: str, shapes: dict[str, tuple[int, ...]]) -> dict[str, Entry]:
  """One Entry per moejax param path in `shapes` (the flattened `transformer.specs(cfg)`). A param with no HF
  counterpart in `arch` is an error naming it: nothing is dropped silently."""
  out = {}
  for path in shapes:
    entry = None
    if path == "embed/tokens":
      entry = Entry(path, ("model.embed_tokens.weight",), "copy")
    elif path == "final_norm/scale":
      entry = Entry(path, ("model.norm.weight",), "copy")
    elif path == "lm_head/w":
      entry = Entry(path, ("lm_head.weight",), "linear")
    else:
      m = re.fullmatch(r"layers/(\d+)/(.+)", path)
      if m:
        entry = _layer_entry(path, int(m[1]), m[2], arch, cfg.moe.num_experts)
    if entry is None:
      raise config.ConfigError(f"moejax param {path!r} has no counterpart in a Hugging Face {arch} "
                               "checkpoint")
    out[path] = entry
  return out


def export_tensors(cfg: config.ModelConfig, arch: str, entries: dict[str, Entry],
                   get: Callable[[str], np.ndarray]) -> Iterator[tuple[str, np.ndarray]]:
  """(HF name, array) pairs in plan order, one moejax param in host memory at a time. Qwen2-MoE always has a
  gated shared expert; where moejax has none (or no gate) we write the exact equivalent: a zero shared expert,
  or a zero gate (sigmoid(0) = 1/2) with the shared down-projection doubled."""
  m = cfg.moe
  for path, entry in entries.items():
    x = get(path)
    if arch == "qwen2_moe" and path.endswith("moe/shared/w_down") and not m.shared_gate:
      x = x * 2
    yield from zip(entry.hf, entry.to_hf(x))
    if arch != "qwen2_moe" or not path.endswith("/attn/wv"):
      continue
    layer = int(path.split("/")[1])
    pre = f"model.layers.{layer}."
    if not cfg.qkv_bias:  # config_to_hf writes qkv_bias=True (older transformers always build the biases)
      for name, n in (("q", cfg.num_heads), ("k", cfg.kv_heads), ("v", cfg.kv_heads)):
        yield pre + f"self_attn.{name}_proj.bias", np.zeros((n * cfg.dim_per_head,), np.float32)
    if m.is_moe_layer(layer) and not m.num_shared_experts:
      D = cfg.d_model
      for proj, shape in (("gate_proj", (1, D)), ("up_proj", (1, D)), ("down_proj", (D, 1))):
        yield pre + f"mlp.shared_expert.{proj}.weight", np.zeros(shape, np.float32)
    if m.is_moe_layer(layer) and not m.shared_gate:
      yield pre + "mlp.shared_expert_gate.weight", np.zeros((1, cfg.d_model), np.float32)
