"""Ahead-of-time compilation for TPU slices on a CPU host (`moejax compile`): `chips` (slice names, published
peaks), `train_step` (checks, the real step lowered on abstract sharded state), `hlo` (collectives),
`report` (memory vs HBM, FLOPs, roofline estimate), `moe_flops` (expert-MLP FLOPs vs the active formula)."""
