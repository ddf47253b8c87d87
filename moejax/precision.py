"""The training dtype policy: bf16 compute, fp32 master params and optimizer state, fp32 where rounding hurts.

A model config carries two dtypes: `param_dtype` (how params are stored, and so the optimizer's moments, which
optax keeps in the param dtype) and `compute_dtype` (activations and the matmuls' inputs; every layer casts its
weights to the activations' dtype at use). Mixed precision is `param_dtype=float32 compute_dtype=bfloat16`:

- master params, gradients and AdamW moments stay float32 (a gradient w.r.t. a float32 param is float32 even
  when the forward ran in bf16, because the cast to bf16 happens inside the differentiated function);
- float32 islands: the router (logits, softmax, top-k; layers/router.py), RMSNorm / LayerNorm statistics
  (layers/norms.py), RoPE's rotation (layers/attention.py), attention's logits and softmax (`jax.nn.
  dot_product_attention` accumulates q.k in float32 and softmaxes in float32; the einsum path does the same), the
  output projection's logits (accumulated in float32, `embed.attend`) and the loss's logsumexp (float32 logits).

What training rejects (`check_train`), both with a ConfigError naming the fix:
- float16 anywhere: fp16's 5-bit exponent under- and overflows gradients without dynamic loss scaling, which
  moejax does not implement; bf16 has float32's range and needs none. (float16 stays fine for inference and
  `import-hf --dtype float16`.)
- `param_dtype=bfloat16` for a full training run: the master weights and Adam moments would be bf16, whose 8-bit
  mantissa drops every update smaller than ~1/256 of the weight. Fine-tuning (`peft.method`) may keep a frozen
  bf16 base.
"""

from __future__ import annotations

from moejax import config


def towers(cfg: config.ExperimentConfig) -> list[tuple[str, config.ModelConfig]]:
  if cfg.task == "clip":
    return [("clip.vision", cfg.clip.vision), ("clip.text", cfg.clip.text)]
  return [("model", cfg.model)]


def check_train(cfg: config.ExperimentConfig) -> None:
  """Raise `config.ConfigError` for a dtype policy training must not run with (see the module docstring)."""
  for where, m in towers(cfg):
    for field in ("param_dtype", "compute_dtype"):
      if getattr(m, field) == "float16":
        raise config.ConfigError(
          f"{where}.{field}='float16' cannot train: float16 gradients under- and overflow without loss scaling, "
          f"which moejax does not implement; use {where}.param_dtype=float32 {where}.compute_dtype=bfloat16 "
          f"(bf16 compute, float32 master params and optimizer state)")
    if m.param_dtype == "bfloat16" and cfg.peft.method == "none":
      raise config.ConfigError(
        f"{where}.param_dtype='bfloat16' would keep the master params and AdamW moments in bfloat16, which drops "
        f"small updates; use {where}.param_dtype=float32 {where}.compute_dtype=bfloat16 (bf16 compute, float32 "
        f"master params and optimizer state)")
