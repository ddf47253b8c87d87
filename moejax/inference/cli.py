"""`moejax generate --workdir RUN --prompt TEXT ...`: continue prompts with a run's newest checkpoint.

Everything the user can get wrong is checked before the checkpoint is read (exit 2, one line, nothing written):
an empty prompt, a prompt plus --max-new-tokens longer than the model's max_seq_len, a negative temperature,
top-p outside (0, 1], top-k < 0, a run directory with no checkpoint, an expert-choice model, a TTMM bank (use
--ttmm with its base). A fine-tune (peft.method lora / spiel_*) generates as its recorded base with its adapters
merged, exactly as its `moejax merge`d run; a missing or changed base is one line too.
"""

from __future__ import annotations

import argparse
import pathlib
import sys
from typing import Any

from moejax import config


def add_parser(sub: Any) -> argparse.ArgumentParser:
  g = sub.add_parser("generate", help="continue prompts with a run's newest checkpoint (KV-cache decoding)")
  g.add_argument("--workdir", required=True, help="a run directory (trained, upcycled, import-hf or a fine-tune)")
  g.add_argument("--prompt", action="append", default=[], help="prompt text (repeat for a batch)")
  g.add_argument("--prompts-file", help="a file with one prompt per line")
  g.add_argument("--max-new-tokens", type=int, default=64)
  g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (the default)")
  g.add_argument("--top-k", type=int, default=0, help="0 = off")
  g.add_argument("--top-p", type=float, default=1.0, help="1 = off")
  g.add_argument("--seed", type=int, default=0)
  g.add_argument("--ttmm", metavar="BANK", help="a TTMM bank built on this run: the prompt's experts are merged into "
                 "the model before generating (one prompt)")
  return g


def _prompts(args) -> list[str]:
  prompts = list(args.prompt)
  if args.prompts_file:
    path = pathlib.Path(args.prompts_file)
    if not path.is_file():
      raise FileNotFoundError(f"--prompts-file {path}: no such file")
    lines = path.read_text(encoding="utf-8").splitlines()
    prompts += [ln for ln in lines if ln.strip()]
    if not lines or not any(ln.strip() for ln in lines):
      raise config.ConfigError(f"--prompts-file {path} has no prompts (one per line)")
  if not prompts:
    raise config.ConfigError("moejax generate needs --prompt TEXT or --prompts-file FILE")
  for i, p in enumerate(prompts):
    if not p:
      raise config.ConfigError(f"prompt {i} is empty: give at least one character to continue")
  return prompts


def _pad_id(tok: Any) -> int:
  """The tokenizer's pad id if it has one, else its EOS id, else 0 (only fills slots after a stop)."""
  for name in ("pad_id", "eos_id"):
    v = getattr(tok, name, None)
    if v is not None:
      return int(v)
  return 0


class _Stream:
  """Prints a single continuation as it grows (text decoded from all tokens so far; the new suffix printed)."""

  def __init__(self, tok: Any, eos_id: int | None):
    self.tok, self.eos_id, self.shown = tok, eos_id, ""

  def text(self, ids) -> str:
    ids = [int(i) for i in ids if self.eos_id is None or int(i) != self.eos_id]
    return self.tok.decode(ids)

  def __call__(self, new_tokens) -> None:
    text = self.text(new_tokens[0]).rstrip("\ufffd")  # a multi-byte character may be cut mid-way
    if text.startswith(self.shown) and len(text) > len(self.shown):
      sys.stdout.write(text[len(self.shown):])
      sys.stdout.flush()
      self.shown = text


def cmd_generate(args) -> int:
  from moejax.inference import sampling

  s = sampling.check(args.temperature, args.top_k, args.top_p)
  if args.max_new_tokens < 1:
    raise config.ConfigError(f"--max-new-tokens={args.max_new_tokens} must be >= 1")
  prompts = _prompts(args)

  from moejax import checkpoint
  from moejax.data import tokenizer

  workdir = pathlib.Path(args.workdir)
  if not workdir.exists():
    raise FileNotFoundError(f"--workdir {workdir}: no such directory")
  checkpoint.resolve_step_dir(workdir)  # raises "has no checkpoints" before anything is loaded
  exp = checkpoint.read_config(workdir)
  if exp.task != "lm":
    raise config.ConfigError(f"{workdir} holds a {exp.task!r} model; moejax generate needs a decoder LM (task=lm)")
  from moejax.inference import decoder

  cfg = decoder.inference_config(exp.model)  # expert-choice models stop here
  tok = tokenizer.get(exp.data.tokenizer)
  ids = [tok.encode(p) for p in prompts]
  for i, x in enumerate(ids):
    if len(x) == 0:
      raise config.ConfigError(f"prompt {i} encodes to no tokens")
    if int(x.max()) >= cfg.vocab_size:
      raise config.ConfigError(f"prompt {i} has token id {int(x.max())} but the model's vocab_size is "
                               f"{cfg.vocab_size} (data.tokenizer={exp.data.tokenizer!r} does not fit the model)")
    if len(x) + args.max_new_tokens > cfg.max_seq_len:
      raise config.ConfigError(f"prompt {i} ({len(x)} tokens) + --max-new-tokens {args.max_new_tokens} exceeds "
                               f"the model's max_seq_len={cfg.max_seq_len}")
  if getattr(args, "ttmm", None):
    if len(prompts) > 1:
      raise config.ConfigError(f"--ttmm merges experts per prompt: give one prompt (got {len(prompts)})")
    from moejax.inference import engine
    from moejax.ttmm import cli as ttmm_cli

    params, es, w_K = ttmm_cli.merged_params_for_prompt(args.ttmm, str(workdir), ids[0], prompts[0])
    kept = [f"{k}:{float(w):.2f}" for k, w in enumerate(w_K.tolist()) if w > 0]
    print(f"moejax: ttmm: merged {len(kept)} of {es.k} experts ({', '.join(kept) or 'none: the base'})",
          file=sys.stderr)
    eng = engine.Engine(params, exp.model, mesh=es.mesh, eos_id=tok.eos_id, pad_id=_pad_id(tok))
  else:
    eng = load_engine(workdir, exp, eos_id=tok.eos_id, pad_id=_pad_id(tok))
  if len(prompts) == 1:
    stream = _Stream(tok, tok.eos_id)
    sys.stdout.write(prompts[0])
    out = eng.generate(ids, max_new_tokens=args.max_new_tokens, s=s, seed=args.seed, chunk=8, on_tokens=stream)
    rest = stream.text(out[0])
    sys.stdout.write(rest[len(stream.shown):] + "\n")
    return 0
  out = eng.generate(ids, max_new_tokens=args.max_new_tokens, s=s, seed=args.seed)
  for i, (p, new) in enumerate(zip(prompts, out)):
    print(f"--- {i} ---")
    print(p + _Stream(tok, tok.eos_id).text(new))
  return 0


def load_engine(workdir: str | pathlib.Path, exp: config.ExperimentConfig | None = None, **engine_kw):
  """An `Engine` over a run's newest params, restored onto the run's mesh (only the params are read). A
  fine-tune (peft.method != none) runs as its recorded base with its adapters merged, as `moejax merge` would
  write it; a missing or changed base is a ConfigError."""
  import jax

  from moejax import checkpoint, sharding
  from moejax.inference import engine
  from moejax.models import transformer

  exp = exp or checkpoint.read_config(workdir)
  if exp.ttmm.clusters:
    raise config.ConfigError(f"{workdir} is a TTMM bank ({exp.ttmm.clusters} LoRA experts), not a model: generate "
                             f"from its base with the bank, `moejax generate --workdir {exp.init.peft_from} "
                             f"--ttmm {workdir} --prompt ...`")
  if exp.peft.method != "none":
    from moejax.peft import merge

    out, params, _ = merge.merged(workdir, verb="generate")
    return engine.Engine(params, exp.model, mesh=out.mesh, **engine_kw)
  mesh = sharding.make_mesh(exp.mesh)
  specs = transformer.specs(exp.model)
  abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), specs,
                          sharding.param_shardings(specs, mesh), is_leaf=sharding.is_spec)
  params, _ = checkpoint.load_params(workdir, abstract)
  return engine.Engine(params, exp.model, mesh=mesh, **engine_kw)
