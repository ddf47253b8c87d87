"""docs/benchmarks.md's `moejax compile` tables equal what `scripts/compile_results.py` prints from the stored
reports (results/compile/<target>/report.json), and every target named there has a stored report. Reading the
reports needs no libtpu: this runs in the main suite."""

import json
import pathlib

from run_helpers import script as _script

from moejax import report

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_docs_compile_tables_equal_the_generator():
  gen = _script("compile_results")
  text = gen.DOC.read_text()
  for target in gen.TARGETS:
    assert gen.load(target) is not None, f"results/compile/{target}/report.json is missing: run compile_results --run"
    got = report.doc_block(text, gen.GENERATOR, target)
    assert got is not None, f"docs/benchmarks.md has lost its generated {target} block"
    assert got == gen.table(target), f"{target}'s table differs from `python {gen.GENERATOR}`: run it"


def test_stored_reports_are_whole_and_say_where_they_came_from():
  gen = _script("compile_results")
  for target, (exp, _, topo, moe_flops) in gen.TARGETS.items():
    r = json.loads((gen.STORE / target / "report.json").read_text())
    assert r["experiment"] == exp and r["topology"] == topo and r["command"] == "moejax " + " ".join(gen.command(target, "out/"))
    m = r["memory_per_device"]
    assert r["fits"] == (m["peak"] <= m["hbm"])  # the verdict is the arithmetic
    prov = r["provenance"]
    assert prov["commit"] and prov["jax"] and prov["libtpu"] and prov["cores"] >= 1 and "load_avg_1m" in prov
    if moe_flops:
      assert set(r["moe_flops_ratio"]) == {"ragged_dot", "megablox"}


def test_docs_bench_tables_equal_the_generator_and_readme_quotes_them():
  gen = _script("bench_results")
  for name, f in gen.RUNS.items():  # every block's run is stored, but for those NOT_STORED says are owed
    assert (gen.STORE / f).exists() != (name in gen.NOT_STORED), f"results/bench/{f} vs NOT_STORED[{name!r}]"
  for name, (_, doc, _) in gen.BLOCKS.items():  # the stored runs' tables and the analytic projection
    assert report.doc_block(doc.read_text(), gen.GENERATOR, name) == gen.table(name), f"run `python {gen.GENERATOR}`"
  # README's bench infer row quotes the MoE twin's ratios at each batch from the same file.
  d = json.loads((gen.STORE / gen.RUNS["peer_moe decode vs transformers"]).read_text())
  ratios = " / ".join(f"{r['moejax_decode_tok_s'] / r['peer_decode_tok_s']:.2f}x" for r in d["peer"]
                      if r["model"] == "peer_moe")
  row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `moejax bench infer"))
  assert f"**{ratios}**" in row, f"README's bench infer row should quote {ratios}"


def test_readme_bench_moe_row_quotes_the_stored_run():
  gen = _script("bench_results")
  d = json.loads((gen.STORE / gen.RUNS["moe layer vs transformers"]).read_text())
  row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `moejax bench moe`"))
  for c in d["verdicts"]:
    ours = next(r for r in d["rows"] if r["config"] == c and r["backend"] not in ("dense", "transformers"))
    best = min(r["fwdbwd_ratio"] for r in d["rows"] if r["config"] == c and r["backend"] == "transformers")
    assert f"{c} **{ours['fwd_ratio']:.2f}x / {ours['fwdbwd_ratio']:.2f}x**" in row, c
    assert f"{c} {best:.2f}x" in row, c
    # The verdict the row states is the stored one's (bench moe.verdict: ahead / level / behind).
    assert d["verdicts"][c].split(" ")[0] in ("ahead", "level", "behind")


def test_readme_and_benchmarks_quote_the_stored_host_allocator_runs():
  gen = _script("bench_results")
  d = json.loads((gen.STORE / gen.RUNS["host allocator"]).read_text())
  assert d["default"]["provenance"]["host_malloc"] == "default" and d["heap"]["provenance"]["host_malloc"] == "heap"
  heap = {(r["config"], r["variant"]): r["fwdbwd_ms"] for r in d["heap"]["rows"]}
  ratios = [heap[(r["config"], r["variant"])] / r["fwdbwd_ms"] for r in d["default"]["rows"]]
  gains = [x for x in ratios if x < 1]
  quoted = f"{min(gains):.2f}-{max(gains):.2f}x the time"
  assert quoted in (ROOT / "README.md").read_text()
  bench = (ROOT / "docs" / "benchmarks.md").read_text()
  assert f"fwd+bwd {quoted}, one hf-eager row excepted" in bench
  assert [round(x, 2) > 1 for x in ratios].count(True) == 1  # the one row the prose excepts


def test_readme_bench_peft_row_quotes_the_stored_runs():
  gen = _script("bench_results")
  row = next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith("| `moejax bench peft`"))
  runs = {b: json.loads((gen.STORE / gen.RUNS[f"peft step time, {b} base"]).read_text()) for b in ("dense", "moe")}
  for label, d in (("dense", runs["dense"]), ("MoE", runs["moe"])):
    lora, ag, ma = (r["step_ms"] for r in d["rows"][:3])
    assert f"{label} SpIEL-AG **{ag / lora:.2f}x**, SpIEL-MA {ma / lora:.2f}x" in row, label
    met = ag / lora <= 1.3
    assert ("met on both bases" in row) == (met and all(
      x["rows"][1]["step_ms"] / x["rows"][0]["step_ms"] <= 1.3 for x in runs.values())), label
  d = runs["dense"]["rows"]
  assert f"SM3's optimizer state {d[0]['optimizer_bytes'] / d[2]['optimizer_bytes']:.0f}x smaller" in row
  loads = [x["provenance"][k] for x in runs.values() for k in ("load_avg_1m", "load_avg_1m_at_end")]
  assert f"load {min(loads):.1f}-{max(loads):.1f}" in row


def test_benchmarks_quotes_the_records_before_and_after_the_512_row_chunks():
  gen = _script("bench_results")
  ours = lambda d, c: next(r["fwdbwd_ratio"] for r in d["rows"] if r["config"] == c and r["backend"] == "sorted")
  before = json.loads((gen.STORE / "moe_peers_chunk128.json").read_text())
  after = json.loads((gen.STORE / gen.RUNS["moe layer vs transformers"]).read_text())
  text = " ".join((ROOT / "docs" / "benchmarks.md").read_text().split())
  quoted = ", ".join(f"{c} {ours(before, c):.2f}x -> {ours(after, c):.2f}x" for c in ("S", "M", "M-fg"))
  assert f"fwd+bwd {quoted}" in text
  p = before["provenance"]
  assert f"load {p['load_avg_1m']:.1f}-{p['load_avg_1m_at_end']:.1f}, kept in `results/bench/moe_peers_chunk128.json`" in text
