"""Train the seed paper's Fashion-MNIST network with snnopt's sparse spiking gradient.

The network of Perez-Nieves & Goodman (NeurIPS 2021): latency-coded 28x28 images (T = 100 steps
of 1 ms), two hidden layers of 200 LIF neurons (τ_mem = 10 ms, θ = 1), a non-spiking leaky
readout of 10 units whose maximum over time are the logits, cross-entropy, Adam at 2e-4. Each
hidden layer is one :class:`snnopt.nn.LinearLIF` with ``backward="sparse"``: its backward pass
visits only the entries whose membrane is within 0.2 of the threshold.

By default it trains for 150 steps on the small synthetic data set bundled in
``examples/data/`` (it stands in for Fashion-MNIST, which needs a download) and finishes in well
under a minute on two CPU cores. Point ``--data`` at a folder holding the Fashion-MNIST IDX files
(``train-images-idx3-ubyte.gz`` etc., from https://github.com/zalandoresearch/fashion-mnist) to
train on the real thing.

Every step prints the loss, the batch accuracy, the step's wall time and the *active fraction*:
the share of (batch, time, neuron) entries of each hidden layer inside the window, i.e. the work
the sparse backward does relative to a dense one. The run fails (exit 1) if the loss becomes NaN
or if the held-out loss has not decreased by the end.

Example::

    python examples/train_seed_network.py                        # bundled data, 150 steps
    python examples/train_seed_network.py --data ~/fashion-mnist --steps 500 --batch-size 256
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

import snnopt.functional as SF
import snnopt.nn as snn
from fashion_data import latency_code, load_bundled, load_fashion_mnist

STEPS_IN_TIME = 100  # T: 100 steps of dt = 1 ms
BETA = math.exp(-1.0 / 10.0)  # exp(-dt / τ), τ_mem = τ_readout = 10 ms
WINDOW = 0.2  # the seed paper's B_th: active when 0.8 < v < 1.2
# A latency-coded pixel fires at most once, so with nn.Linear's initialisation the membranes never
# reach θ and no gradient flows. Hidden weights are N(0, (HIDDEN_GAIN/sqrt(fan_in))²). The authors'
# gain, 20(1-β) ≈ 1.9, suits Fashion-MNIST (42 % of pixels fire) but leaves the bundled images (15 %)
# almost silent; 10 puts about 1.4 % of the hidden entries in the window on both and learns faster.
HIDDEN_GAIN = 10.0


class SeedNetwork(nn.Module):
    """784-200-200-10: two fused LIF layers and a leaky-integrator readout; logits = max over time."""

    def __init__(self, backward: str = "sparse", hidden: int = 200, inputs: int = 784, classes: int = 10):
        super().__init__()
        self.hidden1 = snn.LinearLIF(inputs, hidden, bias=False, beta=BETA, backward=backward, window=WINDOW)
        self.hidden2 = snn.LinearLIF(hidden, hidden, bias=False, beta=BETA, backward=backward, window=WINDOW)
        self.readout = nn.Linear(hidden, classes)
        self.integrate = snn.LeakyIntegrator(beta=BETA)
        with torch.no_grad():
            for layer in (self.hidden1, self.hidden2):
                layer.weight.normal_(0.0, HIDDEN_GAIN / math.sqrt(layer.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.hidden2(self.hidden1(x))
        # out[t] = β out[t-1] + (1 - β) h[t], the paper's normalised leaky readout.
        return self.integrate((1.0 - BETA) * self.readout(hidden)).amax(dim=1)

    @torch.no_grad()
    def active_fractions(self, x: torch.Tensor) -> list[float]:
        """Share of (batch, time, neuron) entries with |v - θ| < window, per hidden layer."""
        fractions = []
        for layer in (self.hidden1, self.hidden2):
            out = SF.linear_lif(x, layer.weight, layer.bias, beta=layer.beta, threshold=layer.threshold,
                                window=layer.spec.window, return_membrane=True)
            fractions.append(((out.membrane - layer.threshold).abs() < layer.spec.window).double().mean().item())
            x = out.spikes
        return fractions


@torch.no_grad()
def evaluate(model: nn.Module, images: np.ndarray, labels: np.ndarray, batch_size: int) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over ``images``."""
    total_loss, correct = 0.0, 0
    for start in range(0, len(images), batch_size):
        logits = model(latency_code(images[start:start + batch_size], STEPS_IN_TIME))
        target = torch.from_numpy(labels[start:start + batch_size].astype(np.int64))
        total_loss += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(dim=1) == target).sum().item()
    return total_loss / len(images), correct / len(images)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=None,
                        help="folder with the Fashion-MNIST IDX files; default: the bundled synthetic set")
    parser.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    parser.add_argument("--batch-size", type=int, default=128, help="default 128 (the paper: 256)")
    parser.add_argument("--lr", type=float, default=2e-4, help="Adam learning rate (default 2e-4, the paper's)")
    parser.add_argument("--backward", choices=("sparse", "exact"), default="sparse",
                        help="sparse: the seed paper's gradient (default); exact: full BPTT, for comparison")
    parser.add_argument("--eval-images", type=int, default=500,
                        help="held-out images scored before and after training (default 500)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "eval_images"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not args.lr > 0:
        parser.error("--lr must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)

    if args.data is None:
        x_train, y_train, x_test, y_test = load_bundled()
        source = "bundled synthetic Fashion-MNIST stand-in"
    else:
        try:
            x_train, y_train, x_test, y_test = load_fashion_mnist(args.data)
        except (OSError, ValueError) as error:
            print(f"error: --data: {error}", file=sys.stderr)
            return 2
        source = f"Fashion-MNIST from {args.data}"
    if x_test is None:  # no t10k files: hold out the end of the training set
        x_train, x_test = x_train[:-args.eval_images], x_train[-args.eval_images:]
        y_train, y_test = y_train[:-args.eval_images], y_train[-args.eval_images:]
    x_test, y_test = x_test[:args.eval_images], y_test[:args.eval_images]
    print(f"data: {source}: {len(x_train)} training images, {len(x_test)} held out; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    model = SeedNetwork(backward=args.backward)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    loss_before, acc_before = evaluate(model, x_test, y_test, args.batch_size)
    print(f"held-out before training: loss {loss_before:.4f}, accuracy {acc_before:.1%}")
    print("(the first step also compiles the backward kernels; numba caches them for the next run)")

    step_times = []
    for step in range(1, args.steps + 1):
        batch = rng.choice(len(x_train), size=min(args.batch_size, len(x_train)), replace=False)
        x = latency_code(x_train[batch], STEPS_IN_TIME)
        target = torch.from_numpy(y_train[batch].astype(np.int64))

        start = time.perf_counter()
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step_times.append(time.perf_counter() - start)

        if not math.isfinite(loss.item()):
            print(f"error: the loss is {loss.item()} at step {step}; training diverged "
                  f"(try a smaller --lr, now {args.lr:g})", file=sys.stderr)
            return 1
        accuracy = (logits.argmax(dim=1) == target).double().mean().item()
        active = model.active_fractions(x)
        print(f"step {step:4d}/{args.steps}  loss {loss.item():.4f}  acc {accuracy:6.1%}  "
              f"{step_times[-1] * 1e3:6.0f} ms  active {active[0]:.2%} / {active[1]:.2%}", flush=True)

    loss_after, acc_after = evaluate(model, x_test, y_test, args.batch_size)
    print(f"held-out after {args.steps} steps: loss {loss_after:.4f} (before {loss_before:.4f}), "
          f"accuracy {acc_after:.1%} (before {acc_before:.1%}); "
          f"median step {np.median(step_times) * 1e3:.0f} ms ({args.backward} backward)")
    if not math.isfinite(loss_after):
        print(f"error: the held-out loss is {loss_after} after training", file=sys.stderr)
        return 1
    if not loss_after < loss_before:
        print(f"error: the held-out loss did not decrease ({loss_before:.4f} -> {loss_after:.4f}); "
              f"train longer (--steps) or check the data", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
