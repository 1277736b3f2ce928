"""Kernels and their readable references: ``reference.py`` (PyTorch BPTT), ``cpu_lif.py`` (numba)."""
