"""What the compiler did to a model: the object :func:`snnopt.explain` returns.

Example::

    >>> report = snnopt.explain(opt)
    >>> [layer.kind for layer in report.layers]
    ['lif', 'lif', 'leaky_integrator']
    >>> print(report)            # a table of fused layers, then the regions left alone and why
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Optional


@dataclass
class FusedLayer:
    """One fused op: its dynamics, constants, backward mode and where it came from."""

    index: int
    kind: str                     # "lif", "cuba_lif" or "leaky_integrator"
    recurrent: bool
    neurons: int
    steps: int
    beta: str                     # a number, or "per-neuron …", or "learnable (name)"
    threshold: Optional[str]
    reset: Optional[str]          # "subtract", "zero", "none" (+ " detached" / " attached")
    surrogate: Optional[str]
    backward: str
    window: Optional[float]
    input: str                    # how the current is computed
    input_gradient: str           # where the input gradient is computed
    source: Optional[str]
    node: str = ""                # the fused call's node name in the optimized graph
    original_nodes: list = field(default_factory=list)  # names of the traced nodes it replaced


@dataclass
class SkippedRegion:
    """A region left exactly as the user wrote it, and why."""

    region: str
    reason: str
    source: Optional[str] = None


@dataclass
class Report:
    """``layers`` fused, ``skipped`` regions with reasons, the pass log and the shape policy."""

    layers: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    passes: list = field(default_factory=list)
    backward: str = "sparse"
    window: float = 0.2
    backend: str = "auto"
    any_shape: bool = False
    traced_shapes: list = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        lines = [f"snnopt: {len(self.layers)} layer(s) fused, {len(self.skipped)} region(s) left as written "
                 f"(backward={self.backward}" + (f", window={self.window:g}" if self.backward == "sparse" else "")
                 + f", backend={self.backend}, optimized in {self.seconds:.2f} s)"]
        if self.layers:
            header = ("#", "kind", "neurons", "steps", "beta", "threshold", "reset", "surrogate", "backward",
                      "input", "source")
            rows = [(str(l.index), l.kind + (" recurrent" if l.recurrent else ""), str(l.neurons), str(l.steps),
                     l.beta, l.threshold or "-", l.reset or "-", l.surrogate or "-",
                     l.backward + (f" (window {l.window:g})" if l.window is not None else ""), l.input,
                     _short(l.source)) for l in self.layers]
            lines += ["", "Fused layers:"] + _table(header, rows)
            notes = [f"  layer {l.index}: input gradient {l.input_gradient}" for l in self.layers
                     if l.input_gradient != "dense"]
            lines += notes
        if self.skipped:
            lines += ["", "Left as written:"]
            lines += [f"  - {s.region}" + (f" at {_short(s.source)}" if s.source else "") + f": {s.reason}"
                      for s in self.skipped]
        shapes = ", ".join(str(tuple(s)) for s in self.traced_shapes)
        lines += ["", "Input shapes: any batch size and number of steps" if self.any_shape
                  else f"Input shapes: fixed to the traced {shapes} (some time-dependent code was not fused)"]
        return "\n".join(lines)


def _short(source: Optional[str]) -> str:
    if not source:
        return "-"
    path, _, line = source.rpartition(":")
    return f"{path.replace(chr(92), '/').rsplit('/', 1)[-1]}:{line}"


def _table(header, rows) -> list:
    widths = [max(len(str(c)) for c in column) for column in zip(header, *rows)]
    def fmt(row):
        return "  " + "  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip()
    return [fmt(header), "  " + "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows]
