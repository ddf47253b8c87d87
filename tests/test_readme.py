"""The README's examples run as written (the ones that need no prior run): every `moejax experiments ...` line,
the `llama_moe` experiment snippet, with only its Hugging Face path pointed at a tiny Llama this test makes, and the
five-line Flax upcycling snippet (run from the repository root, as the README does)."""

import json
import pathlib
import re
import shlex

import pytest

from moejax import cli, config

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def _blocks(lang):
  return re.findall(rf"```{lang}\n(.*?)```", README.read_text(), flags=re.S)


def _experiments_lines():
  lines = []
  for block in _blocks("bash"):
    for line in block.splitlines():
      if line.startswith("moejax experiments "):
        lines.append(line.split("#")[0].strip())
  return lines


def test_readme_has_experiments_lines():
  assert any(" show " in ln for ln in _experiments_lines()) and any(ln.endswith(" list") for ln in _experiments_lines())


@pytest.mark.parametrize("line", _experiments_lines())
def test_readme_experiments_line_runs(line, capsys):
  assert cli.main(shlex.split(line)[1:]) == 0, capsys.readouterr().err
  out = capsys.readouterr().out
  if " show " in line:
    shown = json.loads(out)
    for o in shlex.split(line)[4:]:  # each override is in the shown config
      key, value = config.parse_override(o)
      node = shown
      for part in key.split("."):
        node = node[part]
      assert node == value, (key, node, value)
  else:
    assert "lm_dense_tiny" in out


def test_readme_llama_moe_snippet_derives_its_config(tmp_path):
  """The README's `llama_moe` sets moe.every=1 before moe.offset=0; validating each override alone rejected it."""
  import transformers  # the interop extra is part of the test command: missing is a failure, not a skip

  hf_dir = tmp_path / "llama"
  transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64
                           ).save_pretrained(hf_dir)
  (snippet,) = [b for b in _blocks("python") if "def llama_moe" in b]
  assert snippet.count('"path/to/llama"') == 1
  namespace = {}
  exec(compile(snippet.replace('"path/to/llama"', repr(str(hf_dir))), str(tmp_path / "my_exps.py"), "exec"),
       namespace)
  cfg = namespace["llama_moe"]()
  moe = cfg.model.moe
  assert (moe.num_experts, moe.top_k, moe.every, moe.offset) == (8, 2, 1, 0)
  assert all(cfg.model.moe.is_moe_layer(i) for i in range(cfg.model.num_layers))
  assert (cfg.model.d_model, cfg.model.num_kv_heads, cfg.train.steps) == (32, 2, 1000)
  assert cfg.init.upcycle_from == "runs/llama"


def test_readme_flax_snippet_runs(monkeypatch):
  import sys

  import numpy as np

  (snippet,) = [b for b in _blocks("python") if "moejax.flax.upcycle(" in b]
  monkeypatch.chdir(README.parent)
  monkeypatch.syspath_prepend(str(README.parent))  # `from examples... import Decoder`, as from the repo root
  namespace = {}
  exec(compile(snippet, "README.md", "exec"), namespace)
  logits, loss_extra = namespace["logits"], namespace["loss_extra"]
  assert logits.shape == (2, 64, 256) and np.isfinite(np.asarray(logits)).all()
  assert np.isfinite(float(loss_extra)) and float(loss_extra) > 0  # the upcycled layers' aux losses were collected
  assert "examples.flax_nnx_upcycle" in sys.modules
