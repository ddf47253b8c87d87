"""Expert pruning and merging (EEP, Liu et al. 2024): `candidates` (M / R matrices and applying them), `fitness`
(the jitted calibration evaluation), `search` (the evolutionary search and its archive), `baselines`, `cli`."""
