"""Upcycle your own Flax NNX decoder with moejax: a plain NNX model, trained a little, turned into an MoE.

The model below is ordinary Flax NNX (`nnx.Embed`, `nnx.MultiHeadAttention`, `nnx.LayerNorm`, an MLP of two
`nnx.Linear` with `nnx.gelu`) and knows nothing of moejax. We train it for a few steps on Python's own
documentation (bytes), replace every other MLP by moejax's MoE layer with `moejax.flax.upcycle` (each expert a
copy of the MLP, a fresh router), check that the logits did not change, and train on in the same loop
(`nnx.jit` + optax), adding the MoE aux loss and printing each MoE layer's expert load.

Run:    python examples/flax_nnx_upcycle.py                 (defaults: 150 dense + 150 MoE steps)
        python examples/flax_nnx_upcycle.py --dense-steps 2 --moe-steps 2      (a smoke run)
Expect: "max |logits change| at upcycling" ~1e-6, then the loss keeps falling and the expert loads drift
        away from uniform (see docs/flax.md for one run's numbers).
"""

from __future__ import annotations

import argparse
import sys
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import moejax.flax
from moejax import config

# ----------------------------------------------------------------------------------------------------------
# A plain Flax NNX decoder (nothing moejax-specific here)
# ----------------------------------------------------------------------------------------------------------


class MLP(nnx.Module):
  def __init__(self, d_model: int, d_ff: int, *, rngs: nnx.Rngs):
    self.fc1 = nnx.Linear(d_model, d_ff, rngs=rngs)
    self.fc2 = nnx.Linear(d_ff, d_model, rngs=rngs)

  def __call__(self, x):
    return self.fc2(nnx.gelu(self.fc1(x)))


class Block(nnx.Module):
  def __init__(self, d_model: int, num_heads: int, d_ff: int, *, rngs: nnx.Rngs):
    self.ln1 = nnx.LayerNorm(d_model, rngs=rngs)
    self.attn = nnx.MultiHeadAttention(num_heads=num_heads, in_features=d_model, decode=False, rngs=rngs)
    self.ln2 = nnx.LayerNorm(d_model, rngs=rngs)
    self.mlp = MLP(d_model, d_ff, rngs=rngs)

  def __call__(self, x, mask):
    x = x + self.attn(self.ln1(x), mask=mask)
    return x + self.mlp(self.ln2(x))


class Decoder(nnx.Module):
  def __init__(self, vocab_size: int, d_model: int, num_heads: int, d_ff: int, num_layers: int, max_len: int, *,
               rngs: nnx.Rngs):
    self.token_embed = nnx.Embed(vocab_size, d_model, rngs=rngs)
    self.pos_embed = nnx.Embed(max_len, d_model, rngs=rngs)
    self.blocks = nnx.List([Block(d_model, num_heads, d_ff, rngs=rngs) for _ in range(num_layers)])
    self.ln_f = nnx.LayerNorm(d_model, rngs=rngs)
    self.head = nnx.Linear(d_model, vocab_size, rngs=rngs)

  def __call__(self, tokens):
    x = self.token_embed(tokens) + self.pos_embed(jnp.arange(tokens.shape[1]))[None]
    mask = nnx.make_causal_mask(tokens)
    for block in self.blocks:
      x = block(x, mask)
    return self.head(self.ln_f(x))


# ----------------------------------------------------------------------------------------------------------
# Data: Python's own documentation, as bytes (ships with every Python; nothing is downloaded)
# ----------------------------------------------------------------------------------------------------------


def corpus() -> np.ndarray:
  from pydoc_data import topics  # noqa: PLC0415

  text = "\n\n".join(topics.topics[k] for k in sorted(topics.topics))
  return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)


def batches(data: np.ndarray, batch: int, seq_len: int, seed: int):
  rng = np.random.default_rng(seed)
  while True:
    starts = rng.integers(0, len(data) - seq_len - 1, batch)
    chunk = np.stack([data[s:s + seq_len + 1] for s in starts])
    yield jnp.asarray(chunk[:, :-1]), jnp.asarray(chunk[:, 1:])


# ----------------------------------------------------------------------------------------------------------
# The user's own training step: cross entropy + (for MoE layers) the aux loss they sow
# ----------------------------------------------------------------------------------------------------------


def loss_fn(model, inputs, targets):
  logits, aux, metrics = nnx.capture(model, moejax.flax.AuxLoss, moejax.flax.RouterMetrics)(inputs)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()
  return ce + moejax.flax.sum_named(aux), (ce, metrics)


@nnx.jit
def train_step(model, optimizer, inputs, targets):
  (_, (ce, metrics)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, inputs, targets)
  optimizer.update(model, grads)
  return ce, metrics


def train(model, steps: int, data, lr: float, log_every: int, label: str) -> list[float]:
  optimizer = nnx.Optimizer(model, optax.adamw(lr), wrt=nnx.Param)  # fresh optimizer state after upcycling
  losses = []
  for step in range(steps):
    inputs, targets = next(data)
    ce, metrics = train_step(model, optimizer, inputs, targets)
    losses.append(float(ce))
    if (step + 1) % log_every == 0 or step + 1 == steps:
      window = losses[-log_every:]
      print(f"[{label}] step {step + 1:4d}  loss {np.mean(window):.3f} nats/byte (mean of the last {len(window)} "
            "steps)", flush=True)
      for layer, load in moejax.flax.collect(metrics, "expert_load").items():
        print(f"         {layer:14s} expert load " + " ".join(f"{v:.2f}" for v in np.asarray(load)))
  return losses


def main(argv: list[str] | None = None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dense-steps", type=int, default=150)
  ap.add_argument("--moe-steps", type=int, default=150)
  ap.add_argument("--experts", type=int, default=8)
  ap.add_argument("--top-k", type=int, default=2)
  ap.add_argument("--batch", type=int, default=16)
  ap.add_argument("--seq-len", type=int, default=64)
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--log-every", type=int, default=50)
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  t0 = time.time()
  data = batches(corpus(), args.batch, args.seq_len, args.seed)
  model = Decoder(vocab_size=256, d_model=64, num_heads=4, d_ff=256, num_layers=4, max_len=args.seq_len,
                  rngs=nnx.Rngs(args.seed))
  dense_losses = train(model, args.dense_steps, data, args.lr, args.log_every, "dense")

  probe, _ = next(data)
  before = model(probe)
  # The five lines that matter: every other MLP becomes an 8-expert top-2 MoE initialized from it.
  moejax.flax.upcycle(model, select=r"blocks/[13]/mlp", mlp="fc_gelu",
                      moe=config.MoEConfig(num_experts=args.experts, top_k=args.top_k))
  after, _ = nnx.capture(model, moejax.flax.AuxLoss)(probe)
  change = float(jnp.max(jnp.abs(after - before)))
  moe_paths = ["/".join(map(str, p)) for p, m in nnx.iter_modules(model) if isinstance(m, moejax.flax.MoE)]
  print(f"upcycled {moe_paths}; "
        f"max |logits change| at upcycling: {change:.2e}", flush=True)

  moe_losses = train(model, args.moe_steps, data, args.lr, args.log_every, "moe")
  print(f"done in {time.time() - t0:.0f} s", flush=True)
  return {"dense_losses": dense_losses, "moe_losses": moe_losses, "logits_change": change, "model": model}


if __name__ == "__main__":
  main(sys.argv[1:])
