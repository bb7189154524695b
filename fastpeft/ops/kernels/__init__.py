"""Triton (and CUDA C++) kernels of the adapter methods; see fastpeft/ops/__init__.py for the map.

Importing this package imports Triton: callers that must work without it check ``fastpeft.ops.HAS_TRITON`` first.
"""
