#!/usr/bin/env bash
# The main demo, from scratch: set up .venv, then sparse upcycling at CPU scale.
#   1. pretrain the dense decoder lm_dense_tiny for 300 of its 600 scheduled steps
#   2. spend the remaining 300 steps two ways: (a) continue dense, (b) upcycle to 8 experts (top-2, every other
#      MLP) and continue the same schedule and data stream
#   3. compare validation loss at equal steps and at equal training FLOPs: a table and PNG curves
# Usage: scripts/demo.sh [WORKDIR]   (default runs/demo; re-running resumes / reuses finished runs)
source "$(dirname "$0")/_env.sh"
setup_venv "test"
W="${1:-runs/demo}"
mkdir -p "$W"
start=$(date +%s)
moejax train lm_dense_tiny train.steps=300 train.schedule_steps=600 train.eval_every=50 --workdir "$W/dense_pretrain"
if [ ! -d "$W/dense_continued" ]; then cp -r "$W/dense_pretrain" "$W/dense_continued"; fi
moejax train lm_dense_tiny train.steps=600 train.schedule_steps=600 train.eval_every=50 --workdir "$W/dense_continued"
moejax train lm_upcycle_tiny init.upcycle_from="$W/dense_pretrain" train.eval_every=50 --workdir "$W/moe_upcycled"
moejax report "$W/dense_continued" "$W/moe_upcycled" --out "$W"
moejax report "$W/moe_upcycled" >/dev/null
echo "demo finished in $(( $(date +%s) - start )) s; plots and tables in $W (loss.png, loss_vs_flops.png, report.md,"
echo "and the expert-load heatmap in $W/moe_upcycled/expert_load.png)"
