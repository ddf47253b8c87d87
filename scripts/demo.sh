#!/usr/bin/env bash
# Set up .venv from scratch (if needed) and run the main demo. Usage: scripts/demo.sh [workdir]
source "$(dirname "$0")/_env.sh"
setup_venv "test"
WORKDIR="${1:-runs/demo}"
moejax train lm_dense_tiny --workdir "$WORKDIR/lm_dense_tiny"
moejax report "$WORKDIR/lm_dense_tiny"
