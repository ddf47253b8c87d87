"""moejax: sparse Mixture-of-Experts training in JAX (sharded MoE layers, sparse upcycling, one registry)."""

__version__ = "0.1.0"
