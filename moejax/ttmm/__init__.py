"""Test-time merging of local experts (TTMM; Bertolissi, Hübotter, Hakimi, Krause, COLM 2025): embed, cluster,
K LoRA experts trained in one program, per-prompt weights and a jitted weight-space merge."""
