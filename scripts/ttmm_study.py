"""The TTMM study (docs/results.md): banks of K in --ks LoRA experts built on one base decoder trained on the code
corpus, each evaluated on the held-out documents (perplexity of each document's rest after its 50-token prompt)
against the base, the nearest expert alone, the logit ensemble of the kept experts, a whole-corpus LoRA (a K=1
bank with the largest bank's total steps) and test-time training, with measured test-time cost per prompt.
Writes results.json, table.md and ttmm_perplexity_vs_k.png into --out.

  moejax train lm_dense_pycode_tiny --workdir runs/pycode_base
  python scripts/ttmm_study.py --base runs/pycode_base --out runs/ttmm_study [--ks 1 4 16] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from moejax.ttmm import bank, evaluate  # noqa: E402


def main() -> None:
  ap = argparse.ArgumentParser()
  ap.add_argument("--base", required=True)
  ap.add_argument("--out", required=True)
  ap.add_argument("--ks", type=int, nargs="+", default=[1, 4, 16])
  ap.add_argument("--steps", type=int, default=40, help="optimizer steps per expert")
  ap.add_argument("--lr", type=float, default=3e-3)
  ap.add_argument("--eval-docs", type=int, default=0, help="0 = every validation document")
  ap.add_argument("--ttt-steps", type=int, default=10)
  args = ap.parse_args()
  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  common = [f"optim.lr={args.lr}", f"ttmm.ttt_steps={args.ttt_steps}"]
  ev = [f"ttmm.max_docs={args.eval_docs}"] if args.eval_docs else []
  res = {"args": vars(args), "banks": {}}
  t_all = time.perf_counter()
  kmax = max(args.ks)
  plan = [(f"k{k}", k, args.steps) for k in args.ks] + [("whole", 1, args.steps * kmax)]
  emb = None
  for name, k, steps in plan:
    t = time.perf_counter()
    b = bank.build(args.base, k, out / name, common + [f"train.steps={steps}"], progress=False, embeddings=emb)
    emb = np.load(out / name / "clusters.npz")["embeddings"]  # the same base and documents: embedded once
    built = time.perf_counter() - t
    methods = ["ttmm"] if name == "whole" else ["ttmm", "nearest", "ensemble"]
    if k == kmax and name != "whole":
      methods = ["base", *methods, "ttt"]
    t = time.perf_counter()
    e = evaluate.evaluate(str(out / name), "validation", tuple(methods), overrides=tuple(ev), progress=False)
    res["banks"][name] = {"k": k, "steps": steps, "build": b, "build_s": built, "eval_s": time.perf_counter() - t,
                          "eval": e}
    (out / "results.json").write_text(json.dumps(res, indent=1))
    print(name, json.dumps(e["methods"]), flush=True)
  res["wall_s"] = time.perf_counter() - t_all
  (out / "results.json").write_text(json.dumps(res, indent=1))
  write_table_and_plot(res, out)


def write_table_and_plot(res: dict, out: pathlib.Path) -> None:
  banks = res["banks"]
  ks = [v["k"] for n, v in banks.items() if n != "whole"]
  kmax = max(ks)
  top = banks[f"k{kmax}"]["eval"]["methods"]
  base, ttt = top["base"], top.get("ttt")
  whole = banks["whole"]["eval"]["methods"]["ttmm"]
  rows = ["| method | K | perplexity | test-time cost per prompt (ms, median) |", "|---|---|---|---|",
          f"| base | - | {base['perplexity']:.3f} | {base['cost_ms_per_prompt']:.1f} |",
          f"| whole-corpus LoRA ({banks['whole']['steps']} steps) | 1 | {whole['perplexity']:.3f} | "
          f"{whole['cost_ms_per_prompt']:.1f} |"]
  for k in ks:
    m = banks[f"k{k}"]["eval"]["methods"]
    used = banks[f"k{k}"]["eval"]["mean_experts_merged"]
    rows.append(f"| TTMM (mean {used:.1f} experts merged) | {k} | {m['ttmm']['perplexity']:.3f} | "
                f"{m['ttmm']['cost_ms_per_prompt']:.1f} |")
    rows.append(f"| nearest expert | {k} | {m['nearest']['perplexity']:.3f} | {m['nearest']['cost_ms_per_prompt']:.1f} |")
    rows.append(f"| logit ensemble | {k} | {m['ensemble']['perplexity']:.3f} | "
                f"{m['ensemble']['cost_ms_per_prompt']:.1f} |")
  if ttt:
    rows.append(f"| TTT ({res['args']['ttt_steps']} steps on 8 nearest documents) | - | {ttt['perplexity']:.3f} | "
                f"{ttt['cost_ms_per_prompt']:.1f} |")
  (out / "table.md").write_text("\n".join(rows) + "\n")
  fig, ax = plt.subplots(figsize=(6, 4))
  for m, style in (("ttmm", "o-"), ("nearest", "s--"), ("ensemble", "^:")):
    ax.plot(ks, [banks[f"k{k}"]["eval"]["methods"][m]["perplexity"] for k in ks], style, label=m)
  ax.axhline(base["perplexity"], color="gray", label="base")
  ax.axhline(whole["perplexity"], color="tab:purple", ls="-.", label="whole-corpus LoRA")
  if ttt:
    ax.axhline(ttt["perplexity"], color="tab:red", ls="--", label="TTT")
  ax.set_xscale("log", base=2)
  ax.set_xticks(ks, [str(k) for k in ks])
  ax.set_xlabel("K (clusters = LoRA experts)")
  ax.set_ylabel("held-out perplexity (bytes, after a 50-byte prompt)")
  ax.set_title("TTMM on the code corpus")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(out / "ttmm_perplexity_vs_k.png", dpi=120)
  print((out / "table.md").read_text())


if __name__ == "__main__":
  main()
