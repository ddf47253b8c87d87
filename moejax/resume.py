"""What may change when a run is resumed or evaluated, decided before any checkpoint is touched.

A run directory remembers the config each checkpoint was saved with (`checkpoints/<step>/config`). Resuming
(`moejax train NAME ... --workdir RUN` on a run that has checkpoints) or evaluating it compares the requested
config with that saved one, key by key:

- `SAFE_ON_RESUME` keys may change on resume: how long to train, cadence, mesh (restore reshards), compute-only
  model knobs, optimizer hyperparameters that keep the optimizer state's structure, and `init.*` (only read on a
  fresh start). The change is printed once and appended to `RUN/config_history.jsonl`.
- Any other difference (the model, the data or tokenizer, the task, the seed, optimizer param groups) is a
  `ConfigError` naming every differing key, before anything is read or written: start over in a new `--workdir`,
  or re-run with the saved values (`RUN/config.json`).
- A params-only step (what `moejax upcycle` and `moejax import-hf` write) and `moejax eval` only need the model to
  match: `MODEL_SCOPE` keys outside `COMPUTE_ONLY`.

Only genuine corruption (an unreadable file) makes a checkpoint "damaged" (see checkpoint.py); a mismatch never
does.
"""

from __future__ import annotations

import datetime
import json
import pathlib
from typing import Any

from moejax import config

# Exact keys, or prefixes ending in ".".
SAFE_ON_RESUME = (
  "name",
  "train.steps", "train.eval_every", "train.eval_steps", "train.checkpoint_every", "train.keep_checkpoints",
  "train.log_every", "train.nan_guard", "train.max_consecutive_skips", "train.schedule_steps",
  "optim.lr", "optim.warmup_steps", "optim.schedule", "optim.min_lr_ratio", "optim.decay_start", "optim.weight_decay",
  "optim.clip_norm", "optim.grad_accum",
  "data.worker_count",
  "mesh.",
  "init.",
  "model.remat", "model.moe.gmm_backend",
  "model.remat_policy", "model.attention_impl", "model.moe.ep_exchange", "train.profile_steps",
)
# What a checkpoint's params are: their shapes and what they mean.
MODEL_SCOPE = ("task", "model.", "clip.", "data.tokenizer")
# Model keys that change how the model is computed, not what it computes.
COMPUTE_ONLY = ("model.remat", "model.moe.gmm_backend", "clip.vision.remat", "clip.text.remat",
                "clip.vision.moe.gmm_backend", "clip.text.moe.gmm_backend",
                # how attention, remat and the expert-parallel exchange run, not what they compute (issue 19)
                "model.remat_policy", "model.attention_impl", "model.moe.ep_exchange")


def _matches(key: str, patterns: tuple[str, ...]) -> bool:
  return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[prefix + k] = v
  return out


def differences(saved: config.ExperimentConfig, requested: config.ExperimentConfig) -> dict[str, tuple[Any, Any]]:
  """`{dotted key: (saved value, requested value)}` for every leaf that differs."""
  a, b = _flat(config.to_dict(saved)), _flat(config.to_dict(requested))
  return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def blocking(diff: dict[str, Any], purpose: str) -> list[str]:
  """The keys of `diff` that forbid `purpose`: "resume" (a full train state), "params" (a params-only step, or
  an eval)."""
  if purpose == "resume":
    return [k for k in diff if not _matches(k, SAFE_ON_RESUME)]
  return [k for k in diff if _matches(k, MODEL_SCOPE) and not _matches(k, COMPUTE_ONLY)]


def _show(v: Any) -> str:
  text = json.dumps(v)
  return text if len(text) <= 40 else text[:37] + "..."


def check(saved: config.ExperimentConfig, requested: config.ExperimentConfig, purpose: str,
          where: str, verb: str = "train") -> dict[str, tuple[Any, Any]]:
  """The allowed differences, or a `ConfigError` naming the blocking ones (`where` is the checkpoint)."""
  diff = differences(saved, requested)
  bad = blocking(diff, purpose)
  if bad:
    shown = ", ".join(f"{k} (saved {_show(diff[k][0])}, requested {_show(diff[k][1])})" for k in bad[:8])
    more = f" and {len(bad) - 8} more" if len(bad) > 8 else ""
    what = "resume" if purpose == "resume" else ("evaluate" if verb == "eval" else "start from")
    fix = ("pass the run's own config (omit NAME: `moejax eval --workdir RUN`) or a matching experiment"
           if verb == "eval" else "start over in a new --workdir, or re-run with the saved values "
           f"(see {pathlib.Path(where).parent.parent / 'config.json'})")
    raise config.ConfigError(f"the requested config does not match {where}, so moejax will not {what} it: "
                             f"{shown}{more}; {fix}")
  return diff


def record(workdir: pathlib.Path, step: int, diff: dict[str, tuple[Any, Any]]) -> str:
  """Append the allowed changes to `config_history.jsonl`; returns the one line to print."""
  row = {"time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), "step": step,
         "changed": {k: {"saved": a, "now": b} for k, (a, b) in diff.items()}}
  with open(workdir / "config_history.jsonl", "a") as f:
    f.write(json.dumps(row) + "\n")
  return ("moejax: resuming with changed settings (recorded in config_history.jsonl): "
          + ", ".join(f"{k} {_show(a)} -> {_show(b)}" for k, (a, b) in diff.items()))
