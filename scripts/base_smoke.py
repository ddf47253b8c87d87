"""The base install's smoke: every CLI verb from `pip install -e .` with no extras (no torch, transformers,
tokenizers or pytest). `scripts/base_smoke.sh` builds that install in `.venv-base` and runs this with its Python;
CI runs it after the suite (`.ci/run`).

Two halves:
  * bad input to each verb: exit 2, exactly one stderr line `moejax: error: ...` that names the problem, no
    traceback; a verb or flag that needs an extra names the extra to install;
  * the verbs that need no extra, for real: a tiny train, eval, generate, upcycle, export-hf, and an import-hf of a
    dense Hugging Face safetensors checkpoint written here with numpy (no torch anywhere), then generate from it.

Prints one line per check and closes with `smoke: N passed, N failed`; exit 1 if any failed.
Usage: python scripts/base_smoke.py [--moejax PATH_TO_MOEJAX_EXECUTABLE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile

TINY = ["model.d_model=32", "model.num_layers=2", "model.num_heads=2", "model.d_ff=64", "data.seq_len=32",
        "data.batch_size=8", "train.eval_steps=1", "train.log_every=1", "optim.warmup_steps=2", "train.steps=2",
        "train.checkpoint_every=1", "train.eval_every=100"]
EXTRAS = ("torch", "transformers", "tokenizers", "pytest")


def bad_inputs(d: pathlib.Path) -> list[tuple[str, list[str], str]]:
  """(id, argv, text the one error line must hold): at least one row per verb."""
  run, new, f = str(d / "run"), str(d / "new"), str(d / "a_file")
  return [
    ("experiments-unknown", ["experiments", "show", "lm_dense_tinyy"], "did you mean 'lm_dense_tiny'"),
    ("train-unknown", ["train", "no_such_experiment", "--workdir", new], "unknown experiment 'no_such_experiment'"),
    ("train-unknown-key", ["train", "lm_dense_tiny", "model.num_layer=2", "--workdir", new],
     "did you mean 'model.num_layers'"),
    ("train-workdir-is-file", ["train", "lm_dense_tiny", *TINY, "--workdir", f], "is an existing file"),
    ("eval-missing", ["eval", "--workdir", new], "new"),
    ("generate-missing", ["generate", "--workdir", new, "--prompt", "x"], "new"),
    ("upcycle-missing", ["upcycle", "--from", new, "--exp", "lm_upcycle_tiny", "--to", str(d / "up2")], "new"),
    ("import-hf-missing", ["import-hf", new, "--to", str(d / "imp2")], "does not exist"),
    ("export-hf-missing", ["export-hf", new, "--to", str(d / "hf2")], "new"),
    ("merge-not-finetune", ["merge", "--workdir", run, "--to", str(d / "merged")], "run"),
    ("report-missing", ["report", new], "new"),
    ("prune-missing", ["prune", "--from", new, "--keep", "4", "--task", "sort"], "new"),
    ("ttmm-missing", ["ttmm", "build", "--from", new, "--clusters", "2", "--to", str(d / "bank")], "new"),
    ("bench-unknown", ["bench", "nope"], "invalid choice"),
    ("bench-moe-peer-needs-extra", ["bench", "moe", "--peers", "hf-eager", "--configs", "S"], "interop"),
    ("bench-infer-peer-needs-extra", ["bench", "infer", "peer_dense", "--peer"], "interop"),
  ]


def _moejax(exe: str, argv: list[str], cwd: pathlib.Path) -> subprocess.CompletedProcess:
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  return subprocess.run([exe, *argv], cwd=cwd, env=env, capture_output=True, text=True, timeout=900)


class Checks:
  def __init__(self):
    self.passed, self.failed = 0, 0

  def check(self, name: str, ok: bool, detail: str = "") -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}{'' if ok else ': ' + detail}", flush=True)
    self.passed, self.failed = self.passed + ok, self.failed + (not ok)
    return ok

  def good(self, name, exe, argv, cwd, expect_out: str = "") -> subprocess.CompletedProcess:
    r = _moejax(exe, argv, cwd)
    ok = r.returncode == 0 and "Traceback" not in r.stderr and expect_out in r.stdout
    self.check(name, ok, f"exit {r.returncode}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return r


def write_llama(to: pathlib.Path, vocab: int = 258, d: int = 32, f: int = 64, layers: int = 2, heads: int = 2):
  """A dense Llama checkpoint as Hugging Face stores it (config.json + model.safetensors), random weights, written
  with numpy alone: what a user of the base install imports."""
  import numpy as np
  from safetensors import numpy as st_numpy

  rng = np.random.default_rng(0)
  w = lambda *s: (0.05 * rng.standard_normal(s)).astype(np.float32)
  t = {"model.embed_tokens.weight": w(vocab, d), "model.norm.weight": np.ones(d, np.float32),
       "lm_head.weight": w(vocab, d)}
  for i in range(layers):
    p = f"model.layers.{i}."
    t |= {p + "input_layernorm.weight": np.ones(d, np.float32),
          p + "post_attention_layernorm.weight": np.ones(d, np.float32),
          p + "self_attn.q_proj.weight": w(d, d), p + "self_attn.k_proj.weight": w(d, d),
          p + "self_attn.v_proj.weight": w(d, d), p + "self_attn.o_proj.weight": w(d, d),
          p + "mlp.gate_proj.weight": w(f, d), p + "mlp.up_proj.weight": w(f, d), p + "mlp.down_proj.weight": w(d, f)}
  to.mkdir(parents=True)
  st_numpy.save_file(t, str(to / "model.safetensors"))
  (to / "config.json").write_text(json.dumps({
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": d,
    "intermediate_size": f, "num_hidden_layers": layers, "num_attention_heads": heads,
    "num_key_value_heads": heads, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32"}))


def main() -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--moejax", default=shutil.which("moejax") or "moejax")
  ap.add_argument("--keep", help="work in this directory and keep it (default: a temporary one)")
  args = ap.parse_args()
  c = Checks()
  present = [m for m in EXTRAS if importlib.util.find_spec(m) is not None]
  c.check("no extra installed (torch, transformers, tokenizers, pytest absent)", not present, f"found {present}")
  d = pathlib.Path(args.keep or tempfile.mkdtemp(prefix="moejax-base-smoke-")).resolve()
  d.mkdir(parents=True, exist_ok=True)
  try:
    exe = args.moejax
    (d / "a_file").write_text("not a run\n")
    c.good("train (tiny dense, 2 steps)", exe, ["train", "lm_dense_tiny", *TINY, "--workdir", "run", "--no-progress"],
           d)
    for name, argv, text in bad_inputs(d):
      before = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
      r = _moejax(exe, argv, d)
      lines = r.stderr.strip().splitlines()
      after = sorted(str(p.relative_to(d)) for p in d.rglob("*"))
      ok = (r.returncode == 2 and len(lines) == 1 and lines[0].startswith("moejax: error: ") and text in lines[0]
            and before == after)
      c.check(f"bad input: {name} -> exit 2, one line", ok,
              f"exit {r.returncode}, {len(lines)} stderr lines, wrote {sorted(set(after) - set(before))}: "
              + r.stderr.strip()[-1500:])
    c.good("eval", exe, ["eval", "--workdir", "run"], d)
    c.good("generate", exe, ["generate", "--workdir", "run", "--prompt", "The module", "--max-new-tokens", "8"], d)
    c.good("upcycle (dense run -> 8 experts)", exe,
           ["upcycle", "--from", "run", "--exp", "lm_upcycle_tiny", *TINY, "--to", "upcycled"], d)
    c.good("generate from the upcycled run", exe,
           ["generate", "--workdir", "upcycled", "--prompt", "x", "--max-new-tokens", "4"], d)
    c.good("export-hf (Llama safetensors)", exe, ["export-hf", "run", "--to", "run_hf"], d)
    write_llama(d / "llama_hf")
    c.good("import-hf of a dense Llama (numpy-written safetensors)", exe,
           ["import-hf", "llama_hf", "--to", "imported"], d)
    c.good("generate from the import", exe,
           ["generate", "--workdir", "imported", "--prompt", "hello", "--max-new-tokens", "4"], d)
    c.good("import-hf of our own export", exe, ["import-hf", "run_hf", "--to", "reimported"], d)
  finally:
    if not args.keep:
      shutil.rmtree(d, ignore_errors=True)
  print(f"smoke: {c.passed} passed, {c.failed} failed")
  return 1 if c.failed else 0


if __name__ == "__main__":
  sys.exit(main())
