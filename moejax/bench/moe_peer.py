"""The peer column of `moejax bench moe`: transformers' `MixtralSparseMoeBlock` on the same weights and tokens.

Peers (each needs the interop extra: torch + transformers):
  hf-eager    the block as transformers ships it: a Python loop over the experts hit, gather, two linears,
              `index_add_` (config._experts_implementation="eager")
  hf-grouped  the same block with transformers' "grouped_mm" experts (sort by expert, `torch._grouped_mm`)
  hf-compile  `torch.compile` of the grouped block (inductor; a C++ compiler must be on the machine)

Before anything is timed, each peer's output and gradients (input, router, expert weights) are checked
against moejax's layer on the same weights, with the loss `sum(y * g)` (no aux loss: the block has none), so
a column is only printed for a block that computes what moejax's does. moejax -> Mixtral weights:
`gate_up_proj[e] = [w_gate[e] | w_up[e]]^T` ([2F, D]), `down_proj[e] = w_down[e]^T`, `gate.weight = router/w^T`.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from moejax import config
from moejax.layers import moe

PEERS = ("hf-eager", "hf-grouped", "hf-compile")
_IMPL = {"hf-eager": "eager", "hf-grouped": "grouped_mm", "hf-compile": "grouped_mm"}
TOL = 1e-4  # float32, a whole block (relative to the largest magnitude of each tensor)


def _import_torch():
  """torch with its OpenMP threads sleeping between calls: by default they spin-wait after each op, and in a
  process that interleaves torch and XLA calls on a few cores the spinning slows down the next XLA call (a
  jax matmul right after a torch call: +19% with spinning, +6% without, 2 cores). Set before torch is imported."""
  os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
  import torch

  return torch


def available() -> bool:
  return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def versions(names: list[str]) -> dict:
  """The peers' library versions and torch's thread count, for a stored run ({} when no peer ran)."""
  if not names:
    return {}
  torch = _import_torch()
  import transformers

  return {"torch": torch.__version__, "torch_threads": torch.get_num_threads(),
          "transformers": transformers.__version__}


def _block(p: dict, cfg: config.ModelConfig, impl: str):
  torch = _import_torch()
  from transformers.models.mixtral import configuration_mixtral, modeling_mixtral

  D, F, m = cfg.d_model, cfg.expert_d_ff, cfg.moe
  hf = configuration_mixtral.MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=m.num_experts,
                                           num_experts_per_tok=m.top_k, hidden_act="silu", router_jitter_noise=0.0)
  hf._experts_implementation = impl
  block = modeling_mixtral.MixtralSparseMoeBlock(hf).float()
  ex = {k: np.asarray(v, np.float32) for k, v in p["experts"].items()}
  t = lambda a: torch.from_numpy(np.ascontiguousarray(a))
  with torch.no_grad():
    block.gate.weight.copy_(t(np.asarray(p["router"]["w"], np.float32).T))
    block.experts.gate_up_proj.copy_(t(np.concatenate([ex["w_gate"], ex["w_up"]], 2).transpose(0, 2, 1)))
    block.experts.down_proj.copy_(t(ex["w_down"].transpose(0, 2, 1)))
  return block.train()


def _torch_grads(block, x, g):
  """(y, dx, d router w [D, E], d w_gate, d w_up, d w_down) in moejax's layouts."""
  for prm in block.parameters():
    prm.grad = None
  x = x.detach().requires_grad_(True)
  y = block(x)
  (y * g).sum().backward()
  gu = block.experts.gate_up_proj.grad.numpy().transpose(0, 2, 1)  # [E, D, 2F]
  F = gu.shape[2] // 2
  return (y.detach().numpy(), x.grad.numpy(), block.gate.weight.grad.numpy().T, gu[..., :F], gu[..., F:],
          block.experts.down_proj.grad.numpy().transpose(0, 2, 1))


def _check(name: str, got, want) -> None:
  labels = ("output", "d input", "d router/w", "d w_gate", "d w_up", "d w_down")
  for label, a, b in zip(labels, got, want):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = float(np.max(np.abs(a - b))) / max(1.0, float(np.max(np.abs(b))))
    if a.shape != b.shape or not err <= TOL:
      raise RuntimeError(f"{name}: {label} differs from moejax's (relative max error {err:.3g} > {TOL}); "
                         "refusing to time a block that computes something else")


def peer_fns(names: list[str], p: dict, cfg: config.ModelConfig, x_GSD: jax.Array, g_GSD: jax.Array,
             ) -> tuple[dict[str, Callable[[], object]], dict[str, Callable[[], object]], dict[str, str]]:
  """(forward fns, forward+backward fns, {peer: why it was left out}) for the peers that run and check out."""
  torch = _import_torch()

  def loss(p, x):
    return jnp.sum(moe.apply(p, x, cfg)[0] * g_GSD)

  y = moe.apply(p, x_GSD, cfg)[0]
  dp, dx = jax.jit(jax.grad(loss, argnums=(0, 1)))(p, x_GSD)
  want = (y, dx, dp["router"]["w"], dp["experts"]["w_gate"], dp["experts"]["w_up"], dp["experts"]["w_down"])
  xt, gt = (torch.from_numpy(np.array(a, np.float32)) for a in (x_GSD, g_GSD))
  fwd, bwd, skipped = {}, {}, {}
  for name in names:
    try:
      block = _block(p, cfg, _IMPL[name])
      run = torch.compile(block) if name == "hf-compile" else block
      got = _torch_grads(block if name != "hf-compile" else _Compiled(run, block), xt, gt)
      _check(name, got, want)
    except Exception as e:  # noqa: BLE001 - a peer that does not run here is reported, not fatal
      skipped[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
      continue

    def f(run=run):
      with torch.no_grad():
        return run(xt)

    def b(run=run, block=block):
      for prm in block.parameters():
        prm.grad = None
      xg = xt.detach().requires_grad_(True)
      (run(xg) * gt).sum().backward()
      return xg.grad

    fwd[name], bwd[name] = f, b
  return fwd, bwd, skipped


class _Compiled:
  """A compiled module seen through its source block's parameters (for `_torch_grads`)."""

  def __init__(self, run, block):
    self._run, self.gate, self.experts, self._block = run, block.gate, block.experts, block

  def parameters(self):
    return self._block.parameters()

  def __call__(self, x):
    return self._run(x)
