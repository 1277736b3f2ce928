"""The compiler's passes, in the order they run, and the context they share.

Each pass is a callable object with a ``name`` and ``__call__(gm, context) -> bool`` (whether it
changed the graph), in the spirit of ``torch.fx.passes.infra``'s ``PassBase``; it reports what it
did through ``context.log`` and what it refused through ``context.skip`` (a reason string, which
reaches :func:`snnopt.explain`). Detection passes only annotate; ``fuse_layers`` is the first that
rewrites.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch.fx as fx

from snnopt.passes.canonicalize import Canonicalize
from snnopt.passes.detect_leaky_integrator import DetectLeakyIntegrator
from snnopt.passes.detect_lif_recurrence import DetectLifRecurrence
from snnopt.passes.eliminate_dead_code import EliminateDeadCode
from snnopt.passes.expand_recurrent_linear import ExpandRecurrentLinear
from snnopt.passes.fold_step_slices import FoldStepSlices
from snnopt.passes.fuse_layers import FuseLayers
from snnopt.passes.hoist_linear import HoistLinear
from snnopt.passes.merge_synaptic_current import MergeSynapticCurrent
from snnopt.passes.propagate_active_sets import PropagateActiveSets
from snnopt.passes.recognise_spike_functions import RecogniseSpikeFunctions
from snnopt.passes.report_opaque_recurrences import ReportOpaqueRecurrences
from snnopt.passes.share_constant_subexpressions import ShareConstantSubexpressions
from snnopt.passes.trace import source_of
from snnopt.report import SkippedRegion


@dataclass
class PassContext:
    """Options and results shared by the passes of one ``optimize`` call."""

    backward: str = "sparse"           # what the fused calls are emitted with (exact while validating)
    requested_backward: str = "sparse"  # what the user asked for: refusals that depend on it read this
    window: float = 0.2
    backend: str = "auto"
    excluded_layers: dict = field(default_factory=dict)  # detection order number -> why validation rejected it
    matches: list = field(default_factory=list)
    fused: list = field(default_factory=list)
    skipped: list = field(default_factory=list)
    log_lines: list = field(default_factory=list)

    def log(self, pass_name: str, message: str) -> None:
        self.log_lines.append(f"{pass_name}: {message}")

    def skip(self, node: Optional[fx.Node], reason: str, steps: Optional[int] = None) -> None:
        region = "node " + node.name if node is not None else "model"
        if steps:
            region = f"recurrence from {node.name} ({steps} steps)"
        source = source_of(node) if node is not None else None
        if any(s.reason == reason and s.source == source for s in self.skipped):
            return  # the same refusal for every step of one loop is said once
        self.skipped.append(SkippedRegion(region, reason, source))


class ExcludeLayers:
    """Drop the matches that translation validation rejected, keeping their reason."""

    name = "exclude_rejected_layers"

    def __call__(self, gm, context) -> bool:
        kept = []
        for number, match in enumerate(context.matches):
            match.number = number  # later passes may refuse matches: context.fused is not numbered alike
            if number in context.excluded_layers:
                context.skip(match.states[0], context.excluded_layers[number],
                             steps=len(match.states))
            else:
                kept.append(match)
        context.matches = kept
        return False


PASSES = (
    Canonicalize(),
    ShareConstantSubexpressions(),
    RecogniseSpikeFunctions(),
    ExpandRecurrentLinear(),
    DetectLifRecurrence(),
    DetectLeakyIntegrator(),
    ReportOpaqueRecurrences(),
    MergeSynapticCurrent(),
    ExcludeLayers(),
    HoistLinear(),
    FuseLayers(),
    FoldStepSlices(),
    PropagateActiveSets(),
    EliminateDeadCode(),
)


def run_passes(gm: fx.GraphModule, context: PassContext) -> fx.GraphModule:
    """Run :data:`PASSES` in order on ``gm`` (in place), lint the graph, recompile."""
    for rewrite in PASSES:
        rewrite(gm, context)
        gm.graph.lint()
    gm.recompile()
    return gm
