"""CLIP (`CLIPModel`) <-> the moejax two-tower model (models/two_tower.py, vit.py, text.py).

HF CLIP's encoder layer is our pre-LN block with LayerNorm, biases everywhere and a (quick-)GELU MLP:
  {vision,text}_model.encoder.layers.{i}.layer_norm1 / 2   -> {vision,text}/layers/{i}/attn_norm / mlp_norm
  ....self_attn.{q,k,v,out}_proj.{weight,bias}             -> ..../attn/{wq,wk,wv,wo,bq,bk,bv,bo}
  ....mlp.fc1 / fc2                                        -> ..../mlp/{w_up,b_up} / {w_down,b_down}
and around the blocks:
  vision_model.embeddings.patch_embedding.weight [D,C,P,P] -> vision/patch_embed/w [P*P*C, D] (conv as matmul)
  (no conv bias in CLIP)                                   -> vision/patch_embed/b = 0
  vision_model.embeddings.class_embedding / position_...   -> vision/cls, vision/pos_embed
  vision_model.pre_layrnorm (sic) / post_layernorm         -> vision/pre_norm, vision/final_norm
  text_model.embeddings.token_embedding / position_...     -> text/embed/tokens, text/pos_embed
  text_model.final_layer_norm                              -> text/final_norm
  visual_projection / text_projection [J, D]               -> vision/proj/w, text/proj/w [D, J]
  logit_scale                                              -> logit_scale

Export writes the same mapping back for a dense two-tower model that CLIP's architecture holds exactly
(`export_check` names whatever does not fit: experts, SigLIP's logit bias, mean pooling, ...). A trained
patch-embedding bias has no CLIP tensor of its own; it is folded into the patch positions' embeddings
(every patch token gets both added), which is exact.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from typing import Any

import numpy as np

from moejax import config, sharding
from moejax.interop import hf_lm

# transformers' CLIP{Text,Vision}Config defaults, for keys a config.json leaves out.
_TEXT_DEFAULTS = {"vocab_size": 49408, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12,
                  "num_attention_heads": 8, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                  "layer_norm_eps": 1e-5, "eos_token_id": 49407}
_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}


def _tower(hf: dict, defaults: dict, which: str, param_dtype: str, **kw) -> config.ModelConfig:
  c = {**defaults, **{k: v for k, v in hf.items() if v is not None}}
  if c["hidden_act"] not in _ACTS:
    raise config.ConfigError(f"clip {which}_config.hidden_act={c['hidden_act']!r} is not supported; "
                             f"choose {sorted(_ACTS)}")
  return config.ModelConfig(
    d_model=int(c["hidden_size"]), num_layers=int(c["num_hidden_layers"]),
    num_heads=int(c["num_attention_heads"]), d_ff=int(c["intermediate_size"]),
    activation=_ACTS[c["hidden_act"]], norm="layer", bias=True, norm_eps=float(c["layer_norm_eps"]),
    tie_embeddings=True, param_dtype=param_dtype, compute_dtype=param_dtype, **kw)


def config_from_hf(hf: dict, *, param_dtype: str = "float32") -> config.ClipConfig:
  """CLIPModel config.json (as a dict) -> ClipConfig."""
  if hf.get("model_type") != "clip":
    raise config.ConfigError(f"not a CLIP checkpoint: model_type={hf.get('model_type')!r}")
  t = {**_TEXT_DEFAULTS, **(hf.get("text_config") or {})}
  v = {**_VISION_DEFAULTS, **(hf.get("vision_config") or {})}
  text = _tower(t, _TEXT_DEFAULTS, "text", param_dtype, vocab_size=int(t["vocab_size"]),
                max_seq_len=int(t["max_position_embeddings"]))
  n_tokens = (int(v["image_size"]) // int(v["patch_size"])) ** 2 + 1
  vision = _tower(v, _VISION_DEFAULTS, "vision", param_dtype, vocab_size=1, max_seq_len=n_tokens)
  eos = int(t["eos_token_id"])
  # HF pools at the highest token id when eos_token_id == 2 (configs from before transformers PR #24773, which
  # is what OpenAI's tokenizer gives: its end-of-text id is the largest), else at the first eos_token_id.
  pooling = {"text_pool": "argmax"} if eos == 2 else {"text_pool": "eos", "eos_id": eos}
  return config.ClipConfig(
    vision=vision, text=text, image_size=int(v["image_size"]), patch_size=int(v["patch_size"]),
    channels=int(v["num_channels"]), pool="cls", embed_dim=int(hf.get("projection_dim", 512)), loss="softmax",
    init_temperature=math.exp(-float(hf.get("logit_scale_init_value", 2.6592))), pre_norm=True,
    text_causal=True, **pooling)


@dataclasses.dataclass(frozen=True)
class _PatchEntry(hf_lm.Entry):
  """The patch conv [D, C, P, P] as a matmul over patches flattened in (py, px, c) order: [P*P*C, D]."""

  patch: int = 0
  channels: int = 0

  def hf_shape(self, shape):
    return (shape[1], self.channels, self.patch, self.patch)

  def to_moejax(self, ws, shape):
    return ws[0].transpose(2, 3, 1, 0).reshape(shape)

  def to_hf(self, x):
    return [np.ascontiguousarray(x.reshape(self.patch, self.patch, self.channels, -1).transpose(3, 2, 0, 1))]


@dataclasses.dataclass(frozen=True)
class _ZerosEntry(hf_lm.Entry):
  """A moejax param CLIP does not have (the patch-embedding bias): zeros, the exact equivalent."""

  def to_moejax(self, ws, shape):
    return np.zeros(shape, np.float32)

  def to_hf(self, x):
    return []  # folded into vision/pos_embed by `export_tensors`


_ATTN = {"wq": ("q_proj.weight", "linear", 1), "wk": ("k_proj.weight", "linear", 1),
         "wv": ("v_proj.weight", "linear", 1), "wo": ("out_proj.weight", "linear", 2),
         "bq": ("q_proj.bias", "flat", 0), "bk": ("k_proj.bias", "flat", 0), "bv": ("v_proj.bias", "flat", 0),
         "bo": ("out_proj.bias", "copy", 0)}
_MLP = {"w_up": ("fc1.weight", "linear"), "b_up": ("fc1.bias", "copy"), "w_down": ("fc2.weight", "linear"),
        "b_down": ("fc2.bias", "copy")}
_NORMS = {"attn_norm": "layer_norm1", "mlp_norm": "layer_norm2"}
_LN = {"scale": "weight", "bias": "bias"}
_TOP = {
  "vision/cls": ("vision_model.embeddings.class_embedding", "copy"),
  "vision/pos_embed": ("vision_model.embeddings.position_embedding.weight", "copy"),
  "vision/proj/w": ("visual_projection.weight", "linear"),
  "text/embed/tokens": ("text_model.embeddings.token_embedding.weight", "copy"),
  "text/pos_embed": ("text_model.embeddings.position_embedding.weight", "copy"),
  "text/proj/w": ("text_projection.weight", "linear"),
  "logit_scale": ("logit_scale", "copy"),
}
_TOP_NORMS = {"vision/pre_norm": "vision_model.pre_layrnorm",
              "vision/final_norm": "vision_model.post_layernorm",
              "text/final_norm": "text_model.final_layer_norm"}


def _entry(path: str, cfg: config.ClipConfig) -> hf_lm.Entry | None:
  if path in _TOP:
    name, kind = _TOP[path]
    return hf_lm.Entry(path, (name,), kind)
  if path == "vision/patch_embed/w":
    return _PatchEntry(path, ("vision_model.embeddings.patch_embedding.weight",), "conv",
                       patch=cfg.patch_size, channels=cfg.channels)
  if path == "vision/patch_embed/b":
    return _ZerosEntry(path, (), "zeros")
  m = re.fullmatch(r"(vision/pre_norm|vision/final_norm|text/final_norm)/(scale|bias)", path)
  if m:
    return hf_lm.Entry(path, (f"{_TOP_NORMS[m[1]]}.{_LN[m[2]]}",), "copy")
  m = re.fullmatch(r"(vision|text)/layers/(\d+)/(\w+)/(\w+)", path)
  if not m:
    return None
  tower, i, group, name = m.groups()
  pre = f"{tower}_model.encoder.layers.{i}."
  if group in _NORMS and name in _LN:
    return hf_lm.Entry(path, (pre + f"{_NORMS[group]}.{_LN[name]}",), "copy")
  if group == "attn" and name in _ATTN:
    hf, kind, n_in = _ATTN[name]
    return hf_lm.Entry(path, (pre + "self_attn." + hf,), kind, n_in)
  if group == "mlp" and name in _MLP:
    hf, kind = _MLP[name]
    return hf_lm.Entry(path, (pre + "mlp." + hf,), kind)
  return None


def plan(cfg: config.ClipConfig, shapes: dict[str, tuple[int, ...]]) -> dict[str, hf_lm.Entry]:
  out = {}
  for path in shapes:
    e = _entry(path, cfg)
    if e is None:
      raise config.ConfigError(f"moejax param {path!r} has no counterpart in a Hugging Face CLIP checkpoint")
    out[path] = e
  return out


def load(reader: Any, hf_cfg: dict, mesh: Any, *, param_dtype: str, place: Callable) -> tuple[dict, Any]:
  """(params, ClipConfig) from an open checkpoint `reader`; `place` is `hf.load_entries`."""
  from moejax.models import two_tower

  clip = config_from_hf(hf_cfg, param_dtype=param_dtype)
  exp = config.ExperimentConfig(task="clip", clip=clip)
  specs = two_tower.specs(exp)
  shapes = {p: s.shape for p, s in sharding.flatten(specs, is_leaf=sharding.is_spec).items()}
  params = place(reader, plan(clip, shapes), specs, mesh)
  # position_ids is a buffer some transformers versions saved with the weights.
  extra = reader.unused(lambda n: n.endswith("embeddings.position_ids"))
  if extra:
    raise config.ConfigError(f"CLIP checkpoint has tensors moejax's two-tower model does not hold: {extra[:8]} "
                     f"({len(extra)} in all)")
  return params, clip


# ----------------------------------------------------------------------------------------------------------
# Export
# ----------------------------------------------------------------------------------------------------------


def export_check(c: config.ClipConfig) -> None:
  """Raise `config.ConfigError` listing everything of `c` that a Hugging Face CLIPModel cannot hold."""
  problems = []
  for name, t in (("vision", c.vision), ("text", c.text)):
    p = f"clip.{name}"
    if t.moe.num_experts:
      problems.append(f"{p}.moe.num_experts={t.moe.num_experts} (CLIPModel has no experts)")
    if t.activation not in _ACTS:
      problems.append(f"{p}.activation={t.activation!r} (needs gelu or quick_gelu)")
    if t.norm != "layer" or not t.bias:
      problems.append(f"{p}: norm={t.norm!r}, bias={t.bias} (CLIP needs LayerNorm and biases on every linear)")
    if t.kv_heads != t.num_heads or t.dim_per_head * t.num_heads != t.d_model:
      problems.append(f"{p}: heads must be num_heads x d_model/num_heads (no grouped or explicit head_dim)")
  if c.shared_backbone:
    problems.append("clip.shared_backbone=True (CLIP has two separate towers)")
  if c.pool != "cls" or not c.pre_norm or not c.text_causal:
    problems.append(f"clip.pool={c.pool!r}, pre_norm={c.pre_norm}, text_causal={c.text_causal} (CLIP: cls, "
                    "True, True)")
  if c.loss != "softmax":
    problems.append(f"clip.loss={c.loss!r}: CLIP's logits have no learned bias (SigLIP's logit_bias)")
  if c.text_pool == "eos" and c.eos_id == 2:
    problems.append("clip.eos_id=2 with text_pool='eos': transformers reads eos_token_id=2 as 'pool at the "
                    "highest token id'")
  if problems:
    raise config.ConfigError("cannot export to a Hugging Face CLIPModel: " + "; ".join(problems))


def config_to_hf(c: config.ClipConfig, dtype: str = "float32") -> dict[str, Any]:
  """ClipConfig (already `export_check`ed) -> a CLIPModel config.json dict."""

  def tower(t: config.ModelConfig) -> dict[str, Any]:
    return {"hidden_size": t.d_model, "intermediate_size": t.d_ff, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "hidden_act": t.activation, "layer_norm_eps": t.norm_eps,
            "attention_dropout": 0.0, "projection_dim": c.embed_dim}

  # eos_token_id 2 is how transformers spells "pool at the highest token id" (see config_from_hf).
  eos = 2 if c.text_pool == "argmax" else c.eos_id
  text = {**tower(c.text), "vocab_size": c.text.vocab_size, "max_position_embeddings": c.text.max_seq_len,
          "eos_token_id": eos, "bos_token_id": 0 if eos else 1, "pad_token_id": 1 if eos != 1 else 0}
  vision = {**tower(c.vision), "image_size": c.image_size, "patch_size": c.patch_size,
            "num_channels": c.channels}
  return {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": c.embed_dim,
          "logit_scale_init_value": math.log(1.0 / c.init_temperature), "text_config": text,
          "vision_config": vision, "dtype": dtype, "torch_dtype": dtype}


def export_tensors(c: config.ClipConfig, shapes: dict[str, tuple[int, ...]],
                   get: Callable[[str], np.ndarray]) -> Any:
  """The HF (name, host array) pairs of a two-tower model (`c` already `export_check`ed, as `hf.save_clip_hf`
  does before writing anything); `get(path)` fetches one moejax param to host."""
  for path, entry in plan(c, shapes).items():
    x = get(path)
    if path == "vision/pos_embed":  # fold the patch-embedding bias into the patch positions (row 0: CLS)
      x = x.copy()
      x[1:] += get("vision/patch_embed/b")
    if path == "logit_scale":
      x = x.reshape(())  # a scalar in CLIPModel
    yield from zip(entry.hf, entry.to_hf(x))
