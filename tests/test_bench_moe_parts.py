"""`moejax bench moe --parts`: the parts it times are the layer's own work, split (routing with identity experts,
the expert MLP on the layer's dispatch buffer), checked against the whole layer, and its rows and file."""

import json

import numpy as np
import pytest

from moejax.bench import moe as bench
from moejax.layers import dispatch, moe

SHAPE = (64, 16, 32, 4, 2)  # tokens, d_model, d_ff per expert, experts, top-k


def _call(parts, name):
  f, _, p, x = parts[name]
  return f(p, x)


def test_the_parts_recompose_into_the_layer():
  parts = bench.part_fns(SHAPE, "dropless/auto", "float32", "token_choice", 1.25)
  layout = parts["_layout"]
  x = parts["layer"][3]
  y_layer = _call(parts, "layer")
  # Experts on the layer's buffer, combined by the layer's layout: the layer's output (no shared experts here).
  y_parts = dispatch.combine_rows(_call(parts, "experts"), layout).reshape(x.shape)
  np.testing.assert_allclose(np.asarray(y_parts), np.asarray(y_layer), rtol=1e-5, atol=1e-6)
  # Identity experts: each token gets its renormalized top-k weights (summing to 1) times itself.
  np.testing.assert_allclose(np.asarray(_call(parts, "routing")), np.asarray(x), rtol=1e-5, atol=1e-6)
  # The routing part's aux loss (which its fwd+bwd differentiates) is the layer's.
  p = parts["layer"][2]
  aux_r = parts["_routing"](p, x)[1]["aux_loss"]
  aux_l = moe.apply(p, x, parts["_cfg"])[1]["aux_loss"]
  assert float(aux_l) > 0
  np.testing.assert_allclose(float(aux_r), float(aux_l), rtol=1e-6)


def test_bench_parts_rows_and_the_json_file(tmp_path, monkeypatch):
  monkeypatch.setitem(bench.CPU_CONFIGS, "tiny", SHAPE)
  out = tmp_path / "parts.json"
  assert bench.main(["--parts", "--configs", "tiny", "--iters", "1", "--json", str(out)]) == 0
  d = json.loads(out.read_text())
  rows = d["parts"]
  assert [r["part"] for r in rows] == list(bench.PARTS)
  dense = rows[0]
  assert dense["fwd_x_dense"] == 1.0 and dense["fwdbwd_x_dense"] == 1.0
  for r in rows:
    assert r["fwd_ms"] > 0 and r["fwdbwd_ms"] > 0 and r["config"] == "tiny" and r["backend"] == "sorted"
    assert r["fwd_cpu_ms"] > 0 and r["fwdbwd_cpu_ms"] > 0
    assert abs(r["fwdbwd_ms"] / dense["fwdbwd_ms"] - r["fwdbwd_x_dense"]) < 1e-9
  assert rows[3]["rows"] >= SHAPE[0] * SHAPE[4]  # the dispatch buffer: every assignment, groups tile-padded
  assert {"commit", "cores", "load_avg_1m", "load_avg_1m_at_end", "command", "host_malloc"} <= set(d["provenance"])
  assert "--parts" in d["provenance"]["command"]


def test_parts_takes_one_variant():
  with pytest.raises(SystemExit, match="one variant"):
    bench.main(["--parts", "--configs", "S", "--variants", "dropless/auto", "capacity/auto"])
