#!/usr/bin/env bash
# CLIP-UP at CPU scale, from scratch: set up .venv, then the tiny CLIP trio on the bundled moejax_digits set.
#   1. pretrain the dense CLIP clip_dense_tiny for 300 of its 600 scheduled steps
#   2. spend the remaining 300 steps two ways: (a) continue dense, (b) CLIP-UP: upcycle both towers to 8 experts
#      (top-2, every other MLP) and continue the same schedule at half the LR
#   3. train the same sparse model from scratch for all 600 steps (clip_sparse_scratch_tiny)
#   4. the LR ablation: CLIP-UP at the dense LR (2e-3) instead of half of it, to step 400
#   5. compare at step 600: contrastive loss, retrieval R@1/5/10, zero-shot digit accuracy, training FLOPs
# Usage: scripts/clip_up_demo.sh [WORKDIR]   (default runs/clip_up_demo; re-running resumes / reuses finished runs)
# WORKDIR/provenance.json records the commit, machine, load at start and end, versions and wall time; keep the runs
# with `python scripts/clip_demo_results.py --store WORKDIR` (docs/results.md's blocks are drawn from that record).
# Set MOEJAX_NO_VENV=1 to use the moejax already on PATH instead of building .venv.
if [ -n "${MOEJAX_NO_VENV:-}" ]; then
  set -euo pipefail; cd "$(dirname "$0")/.."; export TF_CPP_MIN_LOG_LEVEL=3
else
  source "$(dirname "$0")/_env.sh"
  setup_venv "test"
fi
W="${1:-runs/clip_up_demo}"
mkdir -p "$W"
start=$(date +%s)
python scripts/clip_demo_results.py --started "$W/provenance.json"
moejax train clip_dense_tiny train.steps=300 --workdir "$W/dense_pretrain"
if [ ! -d "$W/dense_continued" ]; then cp -r "$W/dense_pretrain" "$W/dense_continued"; fi
moejax train clip_dense_tiny --workdir "$W/dense_continued"
moejax train clip_up_tiny init.upcycle_from="$W/dense_pretrain" --workdir "$W/clip_up"
moejax train clip_sparse_scratch_tiny --workdir "$W/sparse_scratch"
moejax train clip_up_tiny init.upcycle_from="$W/dense_pretrain" optim.lr=2e-3 train.steps=400 \
  --workdir "$W/ablation_clip_up_lr2e-3"
moejax report "$W/dense_continued" "$W/clip_up" "$W/sparse_scratch" --out "$W"
moejax report "$W/clip_up" >/dev/null
python scripts/clip_demo_results.py --finished "$W/provenance.json" --command "scripts/clip_up_demo.sh $W"
echo "CLIP-UP demo finished in $(( $(date +%s) - start )) s; plots and tables in $W (loss.png, loss_vs_flops.png,"
echo "retrieval.png, report.md; expert-load heatmap in $W/clip_up/expert_load.png)"
