"""The seed paper's Fashion-MNIST network written as the paper writes it, as an snnopt *model file*.

A plain PyTorch loop over time steps with the authors' SuperSpike autograd Function: the
benchmark's :class:`benchmarks.seed_network.DenseEagerSNN` (784-200-200-10, T = 100, β = e^-0.1,
θ = 1, reset by subtraction, leaky readout, logits = max over time) with the benchmark's initial
weights, fed latency-coded images of the bundled data set. ``snnopt`` fuses its three loops.

Example::

    snnopt compile examples/seed_network_model.py --out build/seed_opt --graph seed.svg
    snnopt inspect examples/seed_network_model.py
    snnopt bench examples/seed_network_model.py --batch 32 --steps 100
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for benchmarks/
from benchmarks.seed_network import DenseEagerSNN, SeedConfig, initial_weights  # noqa: E402
from fashion_data import latency_code, load_bundled  # noqa: E402  (beside this file)

BATCH, STEPS = 16, 100


def build_model() -> torch.nn.Module:
    config = SeedConfig(batch=BATCH, steps=STEPS)
    model = DenseEagerSNN(config)
    with torch.no_grad():
        for parameter, weight in zip(model.weights(), initial_weights(config)):
            parameter.copy_(weight)
    return model


def example_inputs(batch=None, steps=None):
    images = load_bundled()[0][: batch or BATCH]
    return latency_code(images, steps or STEPS)
