"""Kernels: leaf packages over raw arrays. Each folder has `reference.py` (plain jnp, the
specification) beside its backend kernels, and an `__init__` that dispatches by implementation."""
