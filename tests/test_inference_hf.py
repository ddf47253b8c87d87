"""Generation parity with transformers on imported checkpoints, and the `moejax generate` CLI."""

import json
import os
import shutil

os.environ["HF_HUB_OFFLINE"] = "1"

import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Plain imports, not importorskip: the test command installs the interop extra, so a broken install must fail.
import torch  # noqa: E402
import transformers  # noqa: E402
from hf_helpers import randomize  # noqa: E402

from moejax import cli  # noqa: E402
from moejax.inference import cli as inference_cli  # noqa: E402
from moejax.inference import engine  # noqa: E402
from moejax.interop import hf  # noqa: E402

pytestmark = pytest.mark.interop

SMALL = dict(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128, attn_implementation="eager")
NEW = 32


def _build(cls_name: str, seed: int = 0, **kw):
  cfg = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))(**{**SMALL, **kw})
  torch.manual_seed(seed)
  model = getattr(transformers, cls_name)(cfg)
  return randomize(model, seed)  # O(1) logits with clear argmax gaps


def _hf_greedy(model, left_padded: np.ndarray, lengths) -> list[np.ndarray]:
  """transformers' generate(do_sample=False) on a left-padded batch (what it expects for decoders)."""
  mask = (np.arange(left_padded.shape[1])[None] >= left_padded.shape[1] - np.asarray(lengths)[:, None])
  with torch.no_grad():
    out = model.generate(torch.from_numpy(left_padded), attention_mask=torch.from_numpy(mask.astype(np.int64)),
                         do_sample=False, max_new_tokens=NEW, min_new_tokens=NEW, pad_token_id=0,
                         eos_token_id=None)
  return [row[left_padded.shape[1]:] for row in out.numpy()]


def _prompts(vocab: int):
  rng = np.random.default_rng(3)
  lengths = [7, 3]
  left = np.zeros((2, 7), np.int64)
  for b, n in enumerate(lengths):
    left[b, 7 - n:] = rng.integers(1, vocab, n)
  return left, lengths


def _check_parity(model, params, cfg):
  left, lengths = _prompts(cfg.vocab_size)
  want = _hf_greedy(model, left, lengths)
  got = engine.Engine(params, cfg).generate(left.astype(np.int32), lengths=lengths, padding="left",
                                            max_new_tokens=NEW)
  for w, g in zip(want, got):
    np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("cls_name,kw", [
  ("MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
  ("Qwen2MoeForCausalLM", dict(num_hidden_layers=3, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=24,
                               shared_expert_intermediate_size=40, mlp_only_layers=[1], norm_topk_prob=False)),
])
def test_greedy_matches_transformers_moe(tmp_path, cls_name, kw):
  model = _build(cls_name, **kw)
  model.save_pretrained(tmp_path)
  params, cfg = hf.load_hf(tmp_path)
  assert cfg.moe.num_experts == 4
  _check_parity(model, params, cfg)


def _import_llama(tmp_path, vocab=256):
  model = _build("LlamaForCausalLM", vocab_size=vocab, rope_theta=500.0)
  model.save_pretrained(tmp_path / "hf")
  assert cli.main(["import-hf", str(tmp_path / "hf"), "--to", str(tmp_path / "run")]) == 0
  return model, tmp_path / "run"


def test_import_hf_llama_greedy_and_cli_generate(tmp_path, capsys):
  """Llama through `moejax import-hf` (a real workdir): engine == transformers token for token, and `moejax
  generate` prints the prompt followed by the same continuation (byte tokenizer: vocab 256)."""
  model, run = _import_llama(tmp_path)
  eng = inference_cli.load_engine(run)
  left, lengths = _prompts(256)
  want = _hf_greedy(model, left, lengths)
  got = engine.Engine(eng.params, eng.cfg).generate(left.astype(np.int32), lengths=lengths, padding="left",
                                                    max_new_tokens=NEW)
  for w, g in zip(want, got):
    np.testing.assert_array_equal(g, w)
  prompt = "Hello"
  ids = np.frombuffer(prompt.encode(), np.uint8).astype(np.int64)[None]
  hf_new = _hf_greedy(model, ids, [ids.shape[1]])[0]
  eos = 0  # the byte tokenizer's EOS: the CLI stops there
  if (hf_new == eos).any():
    hf_new = hf_new[:int(np.argmax(hf_new == eos))]
  capsys.readouterr()
  assert cli.main(["generate", "--workdir", str(run), "--prompt", prompt, "--max-new-tokens", str(NEW)]) == 0
  out = capsys.readouterr().out
  assert out == prompt + bytes(hf_new.astype(np.uint8)).decode("utf-8", errors="replace") + "\n"


def _listing(root):
  return sorted((str(p.relative_to(root)), p.stat().st_size) for p in root.rglob("*"))


def test_generate_bad_input_exits_2_one_line_nothing_written(tmp_path, capsys, monkeypatch):
  _, run = _import_llama(tmp_path)
  monkeypatch.chdir(tmp_path)
  (tmp_path / "empty_run").mkdir()
  ec = tmp_path / "ec_run"
  shutil.copytree(run, ec)
  cfg = json.loads((ec / "config.json").read_text())
  cfg["model"]["moe"].update(num_experts=4, router="expert_choice", every=1, offset=0)
  (ec / "config.json").write_text(json.dumps(cfg))
  before = _listing(tmp_path)
  cases = [
    (["--prompt", ""], "empty"),
    (["--prompt", "x" * 120, "--max-new-tokens", "20"], "max_seq_len=128"),
    (["--prompt", "hi", "--temperature", "-0.5"], "--temperature"),
    (["--prompt", "hi", "--top-p", "0"], "--top-p"),
    (["--prompt", "hi", "--top-p", "1.5"], "--top-p"),
    (["--prompt", "hi", "--workdir", str(tmp_path / "empty_run")], "checkpoint"),
    (["--prompt", "hi", "--workdir", str(tmp_path / "nowhere")], "nowhere"),
    (["--prompt", "hi", "--workdir", str(ec)], "expert"),
    (["--prompts-file", str(tmp_path / "missing.txt")], "missing.txt"),
  ]
  for flags, needle in cases:
    argv = ["generate", "--workdir", str(run), *flags] if "--workdir" not in flags else ["generate", *flags]
    capsys.readouterr()
    assert cli.main(argv) == 2, flags
    err = capsys.readouterr().err
    assert err.startswith("moejax: error: ") and err.count("\n") == 1 and needle in err, (flags, err)
  assert _listing(tmp_path) == before
