"""docs/benchmarks.md's `moejax compile` tables equal what `scripts/compile_results.py` prints from the stored
reports (results/compile/<target>/report.json), and every target named there has a stored report. Reading the
reports needs no libtpu: this runs in the main suite."""

import json
import pathlib

from run_helpers import script as _script

from moejax import report

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _row(start: str) -> str:
  """README's line that starts with `start` (a row of its "## Benchmarks" table)."""
  return next(line for line in (ROOT / "README.md").read_text().splitlines() if line.startswith(start))


def _stored(gen, name: str) -> dict:
  """The stored run behind bench_results' block `name`."""
  return json.loads((gen.STORE / gen.RUNS[name]).read_text())


def _loads(*runs: dict) -> str:
  """"load A-B": the lowest and highest load average the runs met at their start or end, as README quotes it."""
  loads = [d["provenance"][k] for d in runs for k in ("load_avg_1m", "load_avg_1m_at_end")]
  return f"load {min(loads):.1f}-{max(loads):.1f}"


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
  row = _row("| `moejax bench infer")
  assert f"**{ratios}**" in row, f"README's bench infer row should quote {ratios}"


def test_readme_bench_moe_row_quotes_the_stored_run():
  gen = _script("bench_results")
  d = json.loads((gen.STORE / gen.RUNS["moe layer vs transformers"]).read_text())
  row = _row("| `moejax bench moe`")
  for c in d["verdicts"]:
    ours = next(r for r in d["rows"] if r["config"] == c and r["backend"] not in ("dense", "transformers"))
    best = min(r["fwdbwd_ratio"] for r in d["rows"] if r["config"] == c and r["backend"] == "transformers")
    assert f"{c} **{ours['fwd_ratio']:.2f}x / {ours['fwdbwd_ratio']:.2f}x**" in row, c
    assert f"{c} {best:.2f}x" in row, c
    # The verdict the row states is the stored one's (bench moe.verdict: ahead / level / behind).
    assert d["verdicts"][c].split(" ")[0] in ("ahead", "level", "behind")


def test_readme_bench_moe_row_quotes_the_stored_heap_run():
  """The row's heap-allocator figures and verdicts are the stored run's, and that run used the heap allocator."""
  gen = _script("bench_results")
  d = json.loads((gen.STORE / gen.RUNS["moe layer vs transformers, moejax heap"]).read_text())
  p = d["provenance"]
  assert p["host_malloc"] == "heap"
  row = _row("| `moejax bench moe`")
  assert f"load {p['load_avg_1m']:.1f}-{p['load_avg_1m_at_end']:.1f}, results/bench/moe_peers_heap.json" in row
  ours = [next(r["fwdbwd_ratio"] for r in d["rows"] if r["config"] == c and r["backend"] == "sorted")
          for c in d["verdicts"]]
  best = [min(r["fwdbwd_ratio"] for r in d["rows"] if r["config"] == c and r["backend"] == "transformers")
          for c in d["verdicts"]]
  assert "fwd+bwd " + ", ".join(f"{c} **{x:.2f}x**" for c, x in zip(d["verdicts"], ours)) in row
  assert "best peer's " + " / ".join(f"{x:.2f}x" for x in best) in row
  said = ", ".join(f"{v.split()[0]} at {c}" for c, v in d["verdicts"].items())
  assert said in row
  # every verdict at or ahead: what the target column claims for the heap allocator
  assert all(v.split()[0] in ("ahead", "level") for v in d["verdicts"].values())


def test_benchmarks_quote_the_allocator_pair_at_s():
  """docs/benchmarks.md's S figures (moejax vs torch.compile, heap and glibc default) are the stored A/B pair's."""
  gen = _script("bench_results")
  d = json.loads((gen.STORE / gen.RUNS["host allocator"]).read_text())
  ms = {(k, r["variant"]): r["fwdbwd_ms"] for k in ("default", "heap") for r in d[k]["rows"] if r["config"] == "S"}
  text = " ".join((ROOT / "docs" / "benchmarks.md").read_text().split())
  assert (f"S: moejax {ms['heap', 'dropless/auto']:.1f} ms against torch.compile's {ms['heap', 'hf-compile']:.1f} ms "
          f"with the heap allocator, {ms['default', 'dropless/auto']:.1f} ms against {ms['default', 'hf-compile']:.1f} "
          f"ms without") in text
  assert d["default"]["verdicts"]["S"].startswith("not judged") or d["default"]["verdicts"]["S"].startswith("behind")
  assert all(d["heap"]["verdicts"][c].startswith("level") for c in ("S", "M", "M-fg"))


def test_readme_and_benchmarks_quote_the_stored_host_allocator_runs():
  gen = _script("bench_results")
  d = json.loads((gen.STORE / gen.RUNS["host allocator"]).read_text())
  assert d["default"]["provenance"]["host_malloc"] == "default" and d["heap"]["provenance"]["host_malloc"] == "heap"
  heap = {(r["config"], r["variant"]): r["fwdbwd_ms"] for r in d["heap"]["rows"]}
  ratios = [heap[(r["config"], r["variant"])] / r["fwdbwd_ms"] for r in d["default"]["rows"]]
  gains = [x for x in ratios if round(x, 2) < 1]
  rest = sorted(x for x in ratios if round(x, 2) >= 1)
  quoted = f"{min(gains):.2f}-{max(gains):.2f}x the time"
  readme = " ".join((ROOT / "README.md").read_text().split())
  assert f"{quoted} (three torch rows {rest[0]:.2f}-{rest[-1]:.2f}x)" in readme and len(rest) == 3
  bench = " ".join((ROOT / "docs" / "benchmarks.md").read_text().split())
  assert f"fwd+bwd {quoted}; hf-eager at S and M and torch.compile at S take {rest[0]:.2f}-{rest[-1]:.2f}x" in bench
  assert sorted((r["config"], r["variant"]) for r, x in zip(d["default"]["rows"], ratios) if round(x, 2) >= 1) == [
    ("M", "hf-eager"), ("S", "hf-compile"), ("S", "hf-eager")]  # the rows the prose names


def test_readme_bench_peft_row_quotes_the_stored_runs():
  gen = _script("bench_results")
  row = _row("| `moejax bench peft`")
  runs = {b: json.loads((gen.STORE / gen.RUNS[f"peft step time, {b} base"]).read_text()) for b in ("dense", "moe")}
  for label, d in (("dense", runs["dense"]), ("MoE", runs["moe"])):
    lora, ag, ma = (r["step_ms"] for r in d["rows"][:3])
    assert f"{label} SpIEL-AG **{ag / lora:.2f}x**, SpIEL-MA {ma / lora:.2f}x" in row, label
    met = ag / lora <= 1.3
    assert ("met on both bases" in row) == (met and all(
      x["rows"][1]["step_ms"] / x["rows"][0]["step_ms"] <= 1.3 for x in runs.values())), label
  d = runs["dense"]["rows"]
  assert f"SM3's optimizer state {d[0]['optimizer_bytes'] / d[2]['optimizer_bytes']:.0f}x smaller" in row
  assert _loads(*runs.values()) in row


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


def test_readme_bench_upcycle_row_quotes_the_stored_runs():
  from moejax.bench import upcycle

  gen = _script("bench_results")
  row = _row("| `moejax bench upcycle`")
  steady, fresh, disk = (_stored(gen, f"upcycle {n}") for n in ("in memory, E=2 and 8", "in memory, glibc allocator",
                                                                 "end to end"))
  plain = lambda d, e: next(r for r in d["rows"] if r["experts"] == e and not r["noise"] and not r["drop"])
  x = lambda r: r["upcycle_s"] / r["copy_dense_s"]
  e2, e8 = plain(steady, 2), plain(steady, 8)
  vs_own_size = e8["upcycle_s"] / e8["copy_moe_s"]  # <= 1: upcycling costs what writing its output costs
  assert f"upcycling a {e2['dense_params'] / 1e6:.1f}M-param checkpoint" in row and _loads(steady, fresh, disk) in row
  assert f"E=2 **{x(e2):.2f}x** (glibc's default allocator {x(plain(fresh, 2)):.2f}x)" in row
  assert f"E=8 **{x(e8):.2f}x**, {vs_own_size:.2f}x a copy of its output's size" in row
  bytes_x = e8["moe_bytes"] / e8["dense_bytes"]
  assert f"{bytes_x:.1f}x the bytes: the bytes-moved floor is {upcycle.floor(e8):.2f}x" in row
  orbax = " / ".join(f"{r['upcycle_s'] / r['orbax_copy_s']:.2f}x" for r in disk["rows"])
  assert f"orbax copy of the dense checkpoint) {orbax}" in row
  assert ("E=32 not stored" in row) == ("upcycle in memory, E=32" in gen.NOT_STORED)
  # The verdicts follow the numbers: 2x at E=2; at E=8 (floor above 2x) whether upcycling runs at the floor.
  assert ("<= 2x: met at E=2" in row) == (x(e2) <= 2)
  assert ("this run is above the floor: **not met**" in row) == (vs_own_size > 1)


def test_readme_bench_ttmm_row_quotes_the_stored_run():
  gen = _script("bench_results")
  d = _stored(gen, "ttmm overhead")
  row = _row("| `moejax bench ttmm`")
  x = {r["clusters"]: r["ttmm_s"] / d["forward_s"] for r in d["rows"]}
  first, *rest = x
  quoted = ", ".join([f"K={first} **{x[first]:.2f}x**", *(f"K={k} {x[k]:.2f}x" for k in rest)])
  assert f"{quoted}; TTT {d['ttt_s'] / d['forward_s']:,.0f}x" in row and _loads(d) in row
  assert f"the {d['prefix_tokens']}-token prompt" in row
  assert ("<= 2x: **not met**" in row) == (max(x.values()) > 2)


def test_readme_bench_prune_row_quotes_the_stored_run():
  gen = _script("bench_results")
  d = _stored(gen, "prune fitness cost")
  row = _row("| `moejax bench prune")
  assert d["trained"] and d["keep"] == 4 and d["pruned_top_k"] == 1  # the row's command
  x = {r["candidates_per_call"]: r["s_per_evaluation"] / d["plain_s"] for r in d["rows"]}
  minutes = d["budget"] * min(r["s_per_evaluation"] for r in d["rows"]) / 60
  assert (f"**{x[1]:.2f}x** (one candidate per call), {x[4]:.2f}x (four); a {d['budget']}-evaluation search "
          f"~{minutes:.1f} min") in row and _loads(d) in row
  assert ("<= 1.2x and <= 15 min: **met**" in row) == (max(x.values()) <= 1.2 and minutes <= 15)


def test_readme_bench_infer_row_quotes_the_stored_recompute_run():
  gen = _script("bench_results")
  d = _stored(gen, "cached vs re-run prefix")
  (r,) = d["recompute"]
  row = _row("| `moejax bench infer")
  assert "--new-tokens 256" in d["provenance"]["command"]
  assert f"cached **{r['speedup']:.1f}x** faster per token than re-running the prefix at 256 tokens ({_loads(d)}" in row
  assert ("| >= 10x: met;" in row) == (r["speedup"] >= 10)
