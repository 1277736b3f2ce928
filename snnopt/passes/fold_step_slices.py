"""Fold the per-step slices of a fused layer's output back into the whole tensor.

Matches: ``torch.stack([S[:, 0], S[:, 1], …, S[:, T-1]], dim=d)`` where ``S`` is a fused layer's
batch-first output and the slices are every step in order — the user's ``torch.stack(spk_rec)``
after :mod:`fuse_layers` redirected ``spk_rec`` to the fused output. Produces ``S`` itself
(``d = 1``) or ``S.transpose(0, 1)`` (``d = 0``), so the next layer reads the fused output whole:
no copies, and a sparse-backward producer's spikes arrive unchanged at its consumer (which is what
lets the consumer restrict its input gradient to the producer's active entries). Other stacks are
left alone.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx


def _slice_of(node):
    if isinstance(node, fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        source, index = node.args
        if isinstance(index, tuple) and len(index) == 2 and index[0] == slice(None) and isinstance(index[1], int):
            return source, index[1]
    return None


class FoldStepSlices:
    """Pass: ``stack`` of all per-step slices → the sliced tensor (see module docstring)."""

    name = "fold_step_slices"

    def __call__(self, gm: fx.GraphModule, context) -> bool:
        folded = 0
        for node in list(gm.graph.nodes):
            if not (node.op == "call_function" and node.target is torch.stack):
                continue
            items = node.args[0] if node.args else node.kwargs.get("tensors")
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if not isinstance(items, (list, tuple)) or not items:
                continue
            slices = [_slice_of(item) for item in items]
            if any(s is None for s in slices) or len({s[0] for s in slices}) != 1:
                continue
            source = slices[0][0]
            steps = len(items)
            if [s[1] for s in slices] != list(range(steps)) or dim not in (0, 1, -3):
                continue
            if not _is_fused_output(source, steps):
                continue
            if dim == 1:
                node.replace_all_uses_with(source)
            else:
                with gm.graph.inserting_after(node):
                    swapped = gm.graph.call_method("transpose", (source, 0, 1))
                node.replace_all_uses_with(swapped)
            folded += 1
        context.log(self.name, f"{folded} stacks of per-step slices folded")
        return folded > 0


def _is_fused_output(node, steps) -> bool:
    """Whether ``node`` is ``fused_layer(...)[k]`` of a layer with ``steps`` steps."""
    if not (node.op == "call_function" and node.target is operator.getitem):
        return False
    fused = node.args[0]
    match = fused.meta.get("snnopt_layer") if isinstance(fused, fx.Node) else None
    return match is not None and len(match.states) == steps
