"""`moejax ttmm build|eval`: the TTMM verbs (and `moejax generate --ttmm BANK`'s loader)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(sub: Any, parser_cls: type) -> argparse.ArgumentParser:
  t = sub.add_parser("ttmm", help="test-time merging of LoRA experts: build a bank (embed, cluster, train), eval it")
  ts = t.add_subparsers(dest="ttmm_cmd", required=True, parser_class=parser_cls)
  b = ts.add_parser("build", help="embed the code corpus with BASE, cluster it into K, train one LoRA per cluster")
  b.add_argument("--from", dest="source", required=True, help="the base run (a dense decoder LM run dir)")
  b.add_argument("--clusters", type=int, required=True, help="K: clusters = experts")
  b.add_argument("--to", required=True, help="the bank directory (re-run the same command to resume)")
  b.add_argument("overrides", nargs="*", help="a.b=v on the bank's config (ttmm.*, peft.*, train.steps, ...)")
  b.add_argument("--no-progress", action="store_true")
  e = ts.add_parser("eval", help="held-out perplexity after each document's prefix: TTMM and baselines")
  e.add_argument("--bank", required=True)
  e.add_argument("--split", default="validation")
  e.add_argument("--methods", default="base,ttmm,nearest",
                 help="comma-separated: base, ttmm, nearest, ensemble, ttt")
  e.add_argument("--base", help="the base run (default: the one the bank was built on)")
  e.add_argument("--out", help="also write the result JSON here")
  e.add_argument("overrides", nargs="*", help="ttmm.beta=..., ttmm.tau=..., ttmm.max_merge=...")
  e.add_argument("--no-progress", action="store_true")
  return t


def cmd_ttmm(args) -> int:
  from moejax import config

  if args.ttmm_cmd == "build":
    if args.clusters < 1:
      raise config.ConfigError(f"--clusters {args.clusters} must be >= 1")
    from moejax.ttmm import bank

    out = bank.build(args.source, args.clusters, args.to, list(args.overrides), progress=not args.no_progress)
    print(json.dumps(out, indent=2))
    return 0
  from moejax import paths
  from moejax.ttmm import evaluate

  out_path = paths.check_local(args.out, "--out") if args.out else None
  if out_path is not None and out_path.is_dir():
    raise config.ConfigError(f"--out {out_path} is a directory; give a file name")
  methods = tuple(m.strip() for m in args.methods.split(",") if m.strip())
  res = evaluate.evaluate(args.bank, args.split, methods, base=args.base, overrides=tuple(args.overrides),
                          progress=not args.no_progress)
  text = json.dumps(res, indent=2)
  if out_path is not None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(text)
  print(text)
  return 0


def merged_params_for_prompt(bank: str, base: str, prompt_ids, prompt_text: str):
  """`moejax generate --workdir BASE --ttmm BANK`: the base with the prompt's experts merged in."""
  from moejax.ttmm import bank as bank_lib
  from moejax.ttmm import baselines, embed

  es, bank_params, cl = bank_lib.load(bank, base)
  tm = baselines.TestTime(es, bank_params, cl, embed.make(es.base, es.cfg, bank_lib.pad_id(es.cfg)))
  params, w_K = tm.ttmm_params(prompt_ids, prompt_text)
  return params, es, w_K
