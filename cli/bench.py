"""``snnopt bench``: the original model and its optimized version timed side by side in one run.

Each round runs both variants once, the order alternating between rounds, so both see the same
machine conditions; the numbers are medians over rounds. Per variant: the forward pass (autograd
recording, as in training), the backward pass of a fixed weighted sum of the outputs, a whole
training step (forward, backward, an SGD step with learning rate 0 so every round does the same
work) and the bytes autograd keeps for the backward (counted with ``saved_tensors_hooks``).
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


def _loss(outputs, generator_seed: int = 99):
    leaves, _ = tree_flatten(outputs)
    generator = torch.Generator().manual_seed(generator_seed)
    terms = [(o * torch.rand(o.shape, generator=generator, dtype=o.dtype)).sum()
             for o in leaves if isinstance(o, torch.Tensor) and o.is_floating_point() and o.requires_grad]
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


def _round(module, inputs, optimizer) -> dict:
    module.zero_grad(set_to_none=True)
    started = time.perf_counter()
    loss = _loss(module(*inputs))
    forward = time.perf_counter() - started
    backward = 0.0
    if loss is not None:
        started = time.perf_counter()
        loss.backward()
        backward = time.perf_counter() - started
    started = time.perf_counter()
    optimizer.step()
    step = forward + backward + (time.perf_counter() - started)
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


def run_bench(loaded: LoadedModel, optimized, repeat: int, progress: bool = True) -> dict:
    """Medians of ``repeat`` interleaved rounds of both variants, plus a warm-up round each."""
    variants = {"original": loaded.model, "optimized": optimized}
    parameters = [p for p in loaded.model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(parameters, lr=0.0) if parameters else torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
    samples = {name: [] for name in variants}
    bar = None
    if progress:
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task("benchmarking", total=2 * (repeat + 1))
    try:
        for round_number in range(repeat + 1):  # round 0 warms up (kernel compilation, caches)
            order = list(variants) if round_number % 2 == 0 else list(variants)[::-1]
            for name in order:
                result = _round(variants[name], loaded.inputs, optimizer)
                if round_number:
                    samples[name].append(result)
                if bar is not None:
                    bar.advance(task)
    finally:
        if bar is not None:
            bar.stop()
    results = {"machine": {"cpu": _cpu_name(), "cores": os.cpu_count(),
                           "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version()},
               "inputs": [list(x.shape) for x in loaded.inputs], "repeat": repeat, "variants": {}}
    for name, module in variants.items():
        medians = {key: statistics.median(s[key] for s in samples[name]) for key in ("forward_ms", "backward_ms", "step_ms")}
        medians["saved_mb"] = _saved_bytes(module, loaded.inputs) / 1e6
        results["variants"][name] = medians
    original, fast = results["variants"]["original"], results["variants"]["optimized"]
    results["ratio_original_over_optimized"] = {key: (original[key] / fast[key] if fast[key] else None)
                                               for key, _ in METRICS}
    return results


def print_results(results: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"Original vs optimized: medians of {results['repeat']} rounds, inputs "
                        f"{', '.join(str(tuple(s)) for s in results['inputs'])}", title_justify="left")
    for column in ("", "original", "optimized", "original / optimized"):
        table.add_column(column, justify="right")
    for key, label in METRICS:
        unit = "" if key == "saved_mb" else " ms"
        ratio = results["ratio_original_over_optimized"][key]
        table.add_row(label, f"{results['variants']['original'][key]:.2f}{unit}",
                      f"{results['variants']['optimized'][key]:.2f}{unit}", f"{ratio:.2f}×" if ratio else "-")
    console.print(table)
    machine = results["machine"]
    console.print(f"on {machine['cpu']} ({machine['threads']} threads), torch {machine['torch']}; backward="
                  f"{results['backward']}; optimize() took {results['optimize_seconds']:.2f} s")


def plot_results(results: dict) -> bytes:
    """A PNG bar chart of the three timings, original beside optimized."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        from cli.commands import OutputError

        raise OutputError("--plot needs matplotlib: pip install matplotlib (or 'snnopt[bench]')") from error
    keys = [(k, label) for k, label in METRICS if k != "saved_mb"]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for offset, name in ((-width / 2, "original"), (width / 2, "optimized")):
        axis.bar([i + offset for i in range(len(keys))], [results["variants"][name][k] for k, _ in keys], width,
                 label=name)
    axis.set_xticks(range(len(keys)), [label for _, label in keys])
    axis.set_ylabel("ms (median)")
    axis.set_title(f"snnopt bench: {os.path.basename(results['file'])}, inputs {results['inputs'][0]}")
    axis.legend()
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    return buffer.getvalue()
