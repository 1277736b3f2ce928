"""``snnopt bench``: the original model and its optimized version timed side by side in one run.

Each round runs both variants once, the order alternating between rounds, so both see the same
machine conditions; the numbers are medians over rounds. Per variant: the forward pass (autograd
recording, as in training), the backward pass of a fixed weighted sum of the outputs, a whole
training step (forward, backward, an SGD step with learning rate 0 so every round does the same
work) and the bytes autograd keeps for the backward (counted with ``saved_tensors_hooks``).
On a GPU (``--device cuda``) every phase ends with a device synchronisation, so the times are
the device's; ``--cuda-graphs`` adds a third variant, the optimized model captured with
:func:`snnopt.capture_graphs` (its saved bytes live in the graphs' pool and are not counted).
Nothing here asserts a speed: it measures and reports.

Example::

    $ snnopt bench examples/seed_network_model.py --batch 32 --steps 50 --json
"""

from __future__ import annotations

import io
import os
import platform
import statistics
import time

import torch
from torch.utils._pytree import tree_flatten

from cli.model_file import LoadedModel

METRICS = (("forward_ms", "forward"), ("backward_ms", "backward"), ("step_ms", "training step"),
           ("saved_mb", "kept for backward (MB)"))


class _LossWeights:
    """The benchmark loss's fixed random weights, one per output (by position), made once on its device."""

    def __init__(self, generator_seed: int = 99):
        self.seed, self.made = generator_seed, {}

    def __call__(self, position: int, output: torch.Tensor) -> torch.Tensor:
        key = (position, tuple(output.shape), output.dtype, output.device)
        if key not in self.made:
            generator = torch.Generator().manual_seed(self.seed + position)
            self.made[key] = torch.rand(output.shape, generator=generator, dtype=output.dtype).to(output.device)
        return self.made[key]


def _loss(outputs, weights: _LossWeights):
    leaves, _ = tree_flatten(outputs)
    terms = [(o * weights(k, o)).sum() for k, o in enumerate(leaves)
             if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]
    return sum(terms) if terms else None


def _saved_bytes(module, inputs) -> int:
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*inputs)
    return total


def _round(module, inputs, optimizer, weights: _LossWeights, device: torch.device) -> dict:
    def now():
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the device's time, not the launches'
        return time.perf_counter()

    module.zero_grad(set_to_none=True)
    started = now()
    loss = _loss(module(*inputs), weights)
    forward = now() - started
    backward = 0.0
    if loss is not None:
        started = now()
        loss.backward()
        backward = now() - started
    started = now()
    optimizer.step()
    step = forward + backward + (now() - started)
    return {"forward_ms": forward * 1e3, "backward_ms": backward * 1e3, "step_ms": step * 1e3}


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            names = [line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")]
        if names:
            return names[0]
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_bench(loaded: LoadedModel, optimized, repeat: int, progress: bool = True, graphed=None) -> dict:
    """Medians of ``repeat`` interleaved rounds of every variant, plus a warm-up round each.

    ``graphed``: the optimized model captured as CUDA graphs (a third variant), or None.
    """
    variants = {"original": loaded.model, "optimized": optimized}
    if graphed is not None:
        variants[GRAPHED] = graphed
    device = loaded.inputs[0].device if loaded.inputs else torch.device("cpu")
    weights = _LossWeights()
    parameters = [p for p in loaded.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters or [torch.zeros(1, requires_grad=True)], lr=0.0)
    samples = {name: [] for name in variants}
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("benchmarking", total=len(variants) * (repeat + 1))
    try:
        for round_number in range(repeat + 1):  # round 0 warms up (kernel compilation, caches)
            order = list(variants) if round_number % 2 == 0 else list(variants)[::-1]
            for name in order:
                result = _round(variants[name], loaded.inputs, optimizer, weights, device)
                if round_number:
                    samples[name].append(result)
                if bar is not None:
                    bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    machine = {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
               "torch": torch.__version__, "python": platform.python_version(), "device": str(device)}
    if device.type == "cuda":
        machine["gpu"] = torch.cuda.get_device_name(device)
    results = {"machine": machine, "inputs": [list(x.shape) for x in loaded.inputs], "repeat": repeat,
               "variants": {}}
    for name, module in variants.items():
        medians = {key: statistics.median(s[key] for s in samples[name])
                   for key in ("forward_ms", "backward_ms", "step_ms")}
        # A captured model's saved tensors live in its graphs' pool: nothing to count per call.
        medians["saved_mb"] = None if name == GRAPHED else _saved_bytes(module, loaded.inputs) / 1e6
        results["variants"][name] = medians
    original = results["variants"]["original"]
    for name in variants:
        if name != "original":
            fast = results["variants"][name]
            results[f"ratio_original_over_{name}"] = {
                key: (original[key] / fast[key] if fast[key] and original[key] is not None else None)
                for key, _ in METRICS}
    return results


GRAPHED = "optimized_cuda_graphs"


def print_results(results: dict, console) -> None:
    from rich.table import Table

    names = list(results["variants"])
    table = Table(title=f"Original vs optimized: medians of {results['repeat']} rounds, inputs "
                        f"{', '.join(str(tuple(s)) for s in results['inputs'])}", title_justify="left")
    table.add_column("", justify="right")
    for name in names:
        table.add_column(_LABELS.get(name, name), justify="right")
    for name in names[1:]:
        table.add_column(f"original / {_LABELS.get(name, name)}", justify="right")
    for key, label in METRICS:
        unit = "" if key == "saved_mb" else " ms"
        cells = [f"{v:.2f}{unit}" if v is not None else "-" for v in (results["variants"][n][key] for n in names)]
        ratios = [results[f"ratio_original_over_{n}"][key] for n in names[1:]]
        table.add_row(label, *cells, *(f"{r:.2f}×" if r else "-" for r in ratios))
    console.print(table)
    machine = results["machine"]
    where = f"{machine['gpu']} ({machine['device']})" if "gpu" in machine else \
        f"{machine['cpu']} ({machine['threads']} threads)"
    console.print(f"on {where}, torch {machine['torch']}; backward={results['backward']}; optimize() took "
                  f"{results['optimize_seconds']:.2f} s")


_LABELS = {GRAPHED: "optimized, CUDA graphs"}


def plot_results(results: dict) -> bytes:
    """A PNG bar chart of the three timings, each variant beside the others."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        from cli.commands import OutputError

        raise OutputError("--plot needs matplotlib: pip install matplotlib (or 'snnopt[bench]')") from error
    keys = [(k, label) for k, label in METRICS if k != "saved_mb"]
    names = list(results["variants"])
    figure, axis = plt.subplots(figsize=(6, 3.5))
    width = 0.76 / len(names)
    for k, name in enumerate(names):
        offset = (k - (len(names) - 1) / 2) * width
        axis.bar([i + offset for i in range(len(keys))], [results["variants"][name][key] for key, _ in keys], width,
                 label=_LABELS.get(name, name))
    axis.set_xticks(range(len(keys)), [label for _, label in keys])
    axis.set_ylabel("ms (median)")
    axis.set_title(f"snnopt bench: {os.path.basename(results['file'])}, inputs {results['inputs'][0]}")
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()
