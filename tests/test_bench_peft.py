"""`moejax bench peft --json`: LoRA, SpIEL-AG and SpIEL-MA at one tunable budget, timed interleaved; the file
holds the rows and where they were measured (scripts/bench_results.py generates the docs' table from it)."""

import json

from moejax.bench import peft as bench

TINY = ["model.d_model=16", "model.d_ff=32", "model.num_layers=1", "model.num_heads=2", "data.seq_len=16",
        "model.max_seq_len=16", "data.batch_size=8"]


def test_bench_peft_json(tmp_path):
  out = tmp_path / "peft.json"
  assert bench.main(["lm_dense_tiny", *TINY, "--rank", "2", "--steps", "20", "--no-full", "--json", str(out)]) == 0
  d = json.loads(out.read_text())
  rows = {r["method"]: r for r in d["rows"]}
  assert list(rows) == ["lora r=2", "spiel_ag (= r2)", "spiel_ma (= r2)"]
  # SpIEL is matched to LoRA's tunable count; every method ran the same whole reselection intervals.
  assert len({r["tunable"] for r in rows.values()}) == 1 and rows["lora r=2"]["tunable"] > 0
  assert d["steps"] == 20 and d["interleave"] == 20 and d["rank"] == 2 and d["base"] == "lm_dense_tiny"
  assert all(r["step_ms"] > 0 for r in rows.values())
  assert rows["spiel_ag (= r2)"]["selection_bytes"] > 0 and rows["lora r=2"]["selection_bytes"] < 64
  assert rows["spiel_ma (= r2)"]["optimizer_bytes"] < rows["lora r=2"]["optimizer_bytes"]  # SM3's factored state
  assert {"commit", "cores", "load_avg_1m", "load_avg_1m_at_end", "jax", "command"} <= set(d["provenance"])
  assert d["provenance"]["command"].startswith("moejax bench peft lm_dense_tiny")
