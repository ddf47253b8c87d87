#!/usr/bin/env bash
# The issue-17 studies, resumable (finished runs are skipped), then figures in docs/img/ and a table:
#   scripts/studies.sh clip_up      CLIP-UP on moejax_scenes: 2 budgets x 3 seeds
#   scripts/studies.sh lm_upcycle   LM upcycling on the mixture: +300/+1,500/+3,000 x 3 seeds
#   scripts/studies.sh lm_mature    LM upcycling from a 3,000-step dense parent (--parent-steps): +1,500/+3,000 x 3 seeds,
#                                   with a dense arm given the upcycled arm's FLOPs (its own schedule)
#   scripts/studies.sh clip_mature  CLIP-UP from a 3,000-step dense CLIP: +1,500 x 3 seeds, CLIP-UP at the recipe's and
#                                   the dense LR, FLOP-matched dense and sparse-from-scratch arms
#   scripts/studies.sh capacity     the tiny vs a 4x larger dense CLIP on moejax_scenes (seed 0; clip_up's own runs)
# What each study's runs cost: docs/results.md, "What it cost" (generated from results/studies).
# Options after the study: --seeds 0 1 2 --budgets 300 --arms clip_up dense_continued --root runs/studies
#   --lanes 2 --report-only --partial --dry-run   (python scripts/studies.py --help)
# Runs at `nice -n 5` (set MOEJAX_NICE=0 to change). Set MOEJAX_NO_VENV=1 to use the moejax already on PATH.
if [ -n "${MOEJAX_NO_VENV:-}" ]; then
  set -euo pipefail; cd "$(dirname "$0")/.."; export TF_CPP_MIN_LOG_LEVEL=3; PY=python
else
  source "$(dirname "$0")/_env.sh"
  setup_venv "test"
  PY=.venv/bin/python
fi
if [ $# -lt 1 ]; then echo "usage: scripts/studies.sh clip_up|lm_upcycle|lm_mature|clip_mature|capacity [options]" >&2; exit 2; fi
exec nice -n "${MOEJAX_NICE:-5}" "$PY" scripts/studies.py "$@"
