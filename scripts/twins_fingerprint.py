"""The tiny twins' numbers, to the last bit: a refactor that says "behaviour unchanged" checks against them.

  python scripts/twins_fingerprint.py --out results/twins/<label>.json      record (a few minutes on 2 cores)
  python scripts/twins_fingerprint.py --compare results/twins/<label>.json  record again here and diff: exit 1
                                                                            naming each value that moved

Runs every method through the CLI a user would type, each shrunk to a few steps of a 2-layer d=32 model: full
training (dense, MoE), upcycling, LoRA / SpIEL-AG / SpIEL-MA fine-tunes (dense and
MoE bases) with their merges, a TTMM bank and its eval, EEP and the baseline prunings, KV-cache generation from
each kind of run, and CLIP-UP (token and expert choice). Recorded: every train row's losses and norms, every eval, the fine-tunes' merged
evals, prune.json's choices and scores, generated tokens. Floats are kept as Python writes them (repr), so equality
is bitwise. XLA:CPU's numerics depend on the CPU (AVX-512 or not): compare on the machine that recorded.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import pathlib
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parent.parent

TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64", "data.seq_len=32",
        "data.batch_size=8", "train.eval_steps=1", "train.log_every=1", "optim.warmup_steps=2",
        "train.eval_every=100", "train.checkpoint_every=100"]
MOE = ["model.moe.num_experts=4", "model.moe.every=2"]
SELECT = ["peft.selection_accum_steps=2", "peft.reselection_interval=4", "peft.match_lora_rank=2"]
TASKS = ["model.vocab_size=258", "data.tokenizer=byte_eos", "model.max_seq_len=64", "model.moe.num_experts=4",
         "model.moe.every=1", "model.moe.offset=0"]
CLIP = ["clip.vision.num_layers=2", "clip.text.num_layers=2", "data.batch_size=16", "clip.eval_examples=16",
        "train.eval_steps=1", "train.log_every=1", "train.eval_every=100", "train.checkpoint_every=100"]
SKIP_KEYS = ("throughput", "time", "wall", "seconds", "cost_ms")  # measured, not computed


def _cli(*argv: str) -> str:
  """Run one moejax command in this process; its stdout (stderr passes through). A failure stops the record."""
  from moejax import cli

  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    rc = cli.main([str(a) for a in argv])
  if rc != 0:
    raise SystemExit(f"twins_fingerprint: `moejax {' '.join(map(str, argv))}` exited {rc}")
  return out.getvalue()


def _rows(run: pathlib.Path) -> dict:
  from moejax import metrics

  keep = []
  for r in metrics.read_jsonl(run):
    keep.append({k: v for k, v in r.items() if not any(k.startswith(s) for s in SKIP_KEYS)})
  return {"rows": keep}


def _json_out(text: str) -> dict:
  return json.loads(text[text.index("{"):])


def record(tmp: pathlib.Path) -> dict:
  out: dict[str, dict] = {}
  d, m, up = tmp / "dense", tmp / "moe", tmp / "upcycled"
  _cli("train", "lm_dense_tiny", *TINY, "train.steps=4", "--workdir", d, "--no-progress")
  out["train/dense"] = _rows(d)
  _cli("train", "lm_moe_tiny", *TINY, *MOE, "train.steps=4", "--workdir", m, "--no-progress")
  out["train/moe_token_choice"] = _rows(m)
  _cli("train", "lm_upcycle_tiny", *TINY, f"init.upcycle_from={d}", "train.steps=7", "--workdir", up,
       "--no-progress")
  out["train/upcycled"] = _rows(up)

  for name, exp, base, extra in (("lora", "lm_peft_lora_tiny", d, []),
                                 ("spiel_ag", "lm_peft_spiel_ag_tiny", d, SELECT),
                                 ("spiel_ma", "lm_peft_spiel_ma_tiny", d, SELECT),
                                 ("spiel_ag_moe", "lm_moe_peft_spiel_ag_tiny", m, [*MOE, *SELECT])):
    ft, merged = tmp / name, tmp / f"{name}_merged"
    _cli("train", exp, *TINY, *extra, f"init.peft_from={base}", "train.steps=6", "--workdir", ft, "--no-progress")
    out[f"peft/{name}"] = _rows(ft)
    _cli("merge", "--workdir", ft, "--to", merged)
    out[f"peft/{name}/merged_eval"] = _json_out(_cli("eval", "--workdir", merged))
    out[f"peft/{name}/generate"] = {"text": _cli("generate", "--workdir", ft, "--prompt", "The ", "--max-new-tokens", 8)}

  bank = tmp / "bank"
  _cli("ttmm", "build", "--from", d, "--clusters", 2, "--to", bank, "--no-progress", "ttmm.max_docs=8",
       "ttmm.doc_tokens=64", "peft.lora_rank=2", "train.steps=3", "train.log_every=1")
  out["ttmm/build"] = _rows(bank)
  res = tmp / "ttmm_eval.json"
  _cli("ttmm", "eval", "--bank", bank, "--no-progress", "--methods", "base,ttmm,nearest,ensemble,ttt", "--out", res,
       "ttmm.max_docs=3", "ttmm.ttt_steps=1", "ttmm.doc_tokens=96")
  out["ttmm/eval"] = {k: v for k, v in json.loads(res.read_text()).items() if not any(s in k for s in SKIP_KEYS)}

  tm = tmp / "moe_tasks"
  _cli("train", "lm_moe_tiny", *TINY, *TASKS, "train.steps=3", "--workdir", tm, "--no-progress")
  out["train/moe_tasks"] = _rows(tm)
  for method, extra in (("eep", ["--budget", 6, "--prune-evals", 4, "--metric", "loss"]), ("random", []),
                        ("frequency", []), ("soft", [])):
    to = tmp / f"pruned_{method}"
    _cli("prune", "--from", tm, "--keep", 2, "--top-k", 1, "--task", "lookup", "--method", method,
         "--calibration", 16, *extra, "--to", to, "--no-progress")
    summary = json.loads((to / "prune.json").read_text())
    out[f"prune/{method}"] = {k: v for k, v in summary.items() if not any(s in k for s in SKIP_KEYS)}
    out[f"prune/{method}/eval"] = _json_out(_cli("eval", "--workdir", to))
    out[f"prune/{method}/generate"] = {"text": _cli("generate", "--workdir", to, "--prompt", "lookup:a=1?a=",
                                                    "--max-new-tokens", 4)}

  for name, run in (("dense", d), ("moe_token_choice", m), ("upcycled", up)):
    out[f"generate/{name}"] = {"text": _cli("generate", "--workdir", run, "--prompt", "The ", "--prompt", "def f",
                                            "--max-new-tokens", 8)}
  cd, cu = tmp / "clip_dense", tmp / "clip_up"
  _cli("train", "clip_dense_tiny", *CLIP, "train.steps=2", "--workdir", cd, "--no-progress")
  out["train/clip_dense"] = _rows(cd)
  _cli("train", "clip_up_tiny", *CLIP, f"init.upcycle_from={cd}", "train.steps=4", "--workdir", cu, "--no-progress")
  out["train/clip_up"] = _rows(cu)
  ce = tmp / "clip_up_expert_choice"  # expert choice: an encoder's router (a decoder refuses it)
  _cli("train", "clip_up_tiny", *CLIP, f"init.upcycle_from={cd}", "clip.vision.moe.router=expert_choice",
       "clip.text.moe.router=expert_choice", "train.steps=3", "--workdir", ce, "--no-progress")
  out["train/clip_up_expert_choice"] = _rows(ce)
  return _scrub(out, str(tmp))


def _scrub(x, tmp: str):
  """Temporary paths and measured times out of the record (they differ run to run)."""
  if isinstance(x, dict):
    return {k: _scrub(v, tmp) for k, v in x.items() if not any(s in k for s in SKIP_KEYS)}
  if isinstance(x, list):
    return [_scrub(v, tmp) for v in x]
  return x.replace(tmp, "<tmp>") if isinstance(x, str) else x


def diff(a, b, where: str = "") -> list[str]:
  if isinstance(a, dict) and isinstance(b, dict):
    out = [f"{where}/{k}: only in the record" for k in a.keys() - b.keys()]
    out += [f"{where}/{k}: new" for k in b.keys() - a.keys()]
    for k in sorted(a.keys() & b.keys()):
      out += diff(a[k], b[k], f"{where}/{k}")
    return out
  if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
    return [d for i, (x, y) in enumerate(zip(a, b)) for d in diff(x, y, f"{where}[{i}]")]
  return [] if a == b else [f"{where}: {a!r} -> {b!r}"]


def main(argv: list[str] | None = None) -> int:
  ap = argparse.ArgumentParser(prog="twins_fingerprint", description=__doc__.split("\n\n")[0])
  g = ap.add_mutually_exclusive_group(required=True)
  g.add_argument("--out", help="write the record here")
  g.add_argument("--compare", help="record again and compare with this file")
  a = ap.parse_args(argv)
  sys.path.insert(0, str(ROOT))
  from moejax import provenance

  with tempfile.TemporaryDirectory() as tmp:
    now = record(pathlib.Path(tmp))
  meta = provenance.record(ROOT)
  if a.out:
    pathlib.Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(a.out).write_text(json.dumps({"provenance": meta, "twins": now}, indent=1) + "\n")
    print(f"twins_fingerprint: {len(now)} records written to {a.out}")
    return 0
  old = json.loads(pathlib.Path(a.compare).read_text())
  if old["provenance"]["cpu"] != meta["cpu"] or old["provenance"]["cpu_has_avx512"] != meta["cpu_has_avx512"]:
    print(f"twins_fingerprint: warning: recorded on {old['provenance']['cpu']}, compared on {meta['cpu']}: "
          "XLA:CPU's rounding may differ", file=sys.stderr)
  moved = diff(old["twins"], now)
  for line in moved[:60]:
    print(line)
  print(f"twins_fingerprint: {len(old['twins'])} records compared with {a.compare} (recorded at "
        f"{old['provenance']['commit'][:12]}, now {meta['commit'][:12]}): "
        + ("bit-identical" if not moved else f"{len(moved)} values moved"))
  return 1 if moved else 0


if __name__ == "__main__":
  sys.exit(main())
