"""Spiking layers as ``torch.nn`` modules; see :mod:`snnopt.nn.modules`."""

from snnopt.nn.modules import LIF, LeakyIntegrator, LinearLeakyIntegrator, LinearLIF

__all__ = ["LIF", "LeakyIntegrator", "LinearLeakyIntegrator", "LinearLIF"]
