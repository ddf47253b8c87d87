"""Helpers for tests that need a real run directory: the tiny config of conftest's `tiny_lm_run`, a snapshot of a
directory tree (to assert that a command wrote, moved or deleted nothing), numpy-drawn decoder params, a
SIGTERM sent from inside a run (preemption tests), and a script of scripts/ loaded as a module."""

import hashlib
import importlib.util
import os
import pathlib
import signal

import numpy as np

# lm_dense_tiny, shrunk: conftest's `tiny_lm_run` trains it for 2 steps with a checkpoint at each.
TINY_LM = ("model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64", "data.seq_len=32",
           "data.batch_size=8", "train.eval_steps=1", "train.log_every=1", "optim.warmup_steps=2",
           "train.steps=2", "train.checkpoint_every=1", "train.eval_every=100")


def tree(root: pathlib.Path) -> dict[str, str]:
  """{relative path: content hash (files) or "dir"} for everything under `root`."""
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
          for p in sorted(root.rglob("*"))}


def recompute_greedy(params, prompt, cfg, n: int, width: int = 32) -> np.ndarray:
  """Greedy decoding the slow way, the reference for the KV-cache decoder: the whole prefix through
  `transformer.forward` for every token (padded to `width` after the prefix, which a causal model never sees: one
  compile)."""
  import jax
  import jax.numpy as jnp

  from moejax.models import transformer

  fwd = jax.jit(lambda p, t, i: jnp.argmax(transformer.forward(p, t, cfg)[0][0, i]))
  toks = list(prompt)
  for _ in range(n):
    buf = np.zeros((1, width), np.int32)
    buf[0, :len(toks)] = toks
    toks.append(int(fwd(params, buf, len(toks) - 1)))
  return np.asarray(toks[len(prompt):])


def numpy_params(cfg, seed: int = 0) -> dict:
  """A decoder's params drawn with numpy (cheaper than eager jax.random per param on 2 cores), O(1) activations;
  router weights give O(1) logits, so routing differs between tokens and a wrong expert column shows up."""
  from moejax import sharding
  from moejax.models import transformer

  rng = np.random.default_rng(seed)
  flat = sharding.flatten(transformer.specs(cfg), is_leaf=sharding.is_spec)
  return sharding.unflatten({p: (1.0 + 0.1 * rng.normal(size=s.shape) if p.endswith("norm/scale")
                                 else rng.normal(size=s.shape) / np.sqrt(s.shape[-2] if len(s.shape) > 1 else 50))
                             .astype(np.float32) for p, s in flat.items()})


def sigterm_at_call(real, n: int):
  """`real`, wrapped to send this process SIGTERM (as a scheduler would) during its `n`-th call."""
  calls = [0]

  def wrapped(*args, **kwargs):
    calls[0] += 1
    if calls[0] == n:
      os.kill(os.getpid(), signal.SIGTERM)
    return real(*args, **kwargs)

  return wrapped


def script(name: str):
  """scripts/<name>.py as a module (scripts/ is not a package): the docs generators the tests compare against."""
  spec = importlib.util.spec_from_file_location(name, pathlib.Path(__file__).resolve().parent.parent / "scripts" /
                                                f"{name}.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod
