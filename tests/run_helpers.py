"""Helpers for tests that need a real run directory: the tiny config of conftest's `tiny_lm_run` and a
snapshot of a directory tree (to assert that a command wrote, moved or deleted nothing)."""

import hashlib
import pathlib

# lm_dense_tiny, shrunk: conftest's `tiny_lm_run` trains it for 2 steps with a checkpoint at each.
TINY_LM = ("model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64", "data.seq_len=32",
           "data.batch_size=8", "train.eval_steps=1", "train.log_every=1", "optim.warmup_steps=2",
           "train.steps=2", "train.checkpoint_every=1", "train.eval_every=100")


def tree(root: pathlib.Path) -> dict[str, str]:
  """{relative path: content hash (files) or "dir"} for everything under `root`."""
  root = pathlib.Path(root)
  return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() if p.is_file() else "dir"
          for p in sorted(root.rglob("*"))}
