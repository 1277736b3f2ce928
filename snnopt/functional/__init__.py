"""Fused spiking layers as functions; see :mod:`snnopt.functional.spiking`."""

from snnopt.functional.spiking import (LifOutput, LifState, leaky_integrator, lif, linear_leaky_integrator,
                                       linear_lif)

__all__ = ["LifOutput", "LifState", "leaky_integrator", "lif", "linear_leaky_integrator", "linear_lif"]
