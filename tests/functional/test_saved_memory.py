"""Bytes saved for backward: an algorithmic property of the sparse backward, not a timing.

The sparse backward needs only the active entries (and the input, as events), so at low activity
it saves a small fraction of what dense BPTT saves; at full activity it falls back to dense math
and saves about one value per (batch, step, neuron), never more.
"""

import pytest
import torch

import snnopt.functional as snf
from snnopt.codegen.reference import reference_lif, reference_linear_lif
from snnopt.spec import LifSpec


def saved_bytes(fn, *inputs):
    """Bytes of the tensors autograd saves while ``fn`` runs, not counting views of ``inputs``."""
    input_storages = {t.untyped_storage().data_ptr() for t in inputs}
    total = 0

    def pack(tensor):
        nonlocal total
        if tensor.untyped_storage().data_ptr() not in input_storages:
            total += tensor.numel() * tensor.element_size()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = fn()
    return out, total


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_lif_saves_a_fraction_of_dense_bptt_at_low_activity(dtype):
    gen = torch.Generator().manual_seed(0)
    current = (torch.rand(8, 50, 64, generator=gen, dtype=dtype) * 0.25).requires_grad_()
    out, sparse = saved_bytes(lambda: snf.lif(current, beta=0.85, window=0.05, return_membrane=True), current)
    active = ((out.membrane - 1.0).abs() < 0.05).double().mean()
    assert 0 < active < 0.05, f"test needs low but nonzero activity, got {active:.3f}"
    _, dense = saved_bytes(lambda: reference_lif(current, LifSpec(window=0.05), beta=0.85), current)
    assert sparse <= 0.2 * dense, f"sparse saved {sparse} bytes, dense BPTT {dense}"
    assert sparse < 0.5 * current.numel() * current.element_size(), "the membrane history must not be saved"


def test_sparse_linear_lif_saves_a_fraction_of_dense_bptt_for_sparse_input():
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(8, 50, 100, generator=gen) < 0.05).float().requires_grad_()
    weight = (torch.randn(64, 100, generator=gen) * 0.3).requires_grad_()
    # The input is counted: dense BPTT saves it for the weight gradient, the sparse op its events.
    out, sparse = saved_bytes(lambda: snf.linear_lif(x, weight, beta=0.9, window=0.05, return_membrane=True), weight)
    active = ((out.membrane - 1.0).abs() < 0.05).double().mean()
    assert 0 < active < 0.05, f"test needs low but nonzero activity, got {active:.3f}"
    _, dense = saved_bytes(lambda: reference_linear_lif(x, weight, None, LifSpec(window=0.05), beta=0.9), weight)
    assert sparse <= 0.2 * dense, f"sparse saved {sparse} bytes, dense BPTT {dense}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sparse_lif_memory_stays_bounded_when_everything_is_active(dtype):
    gen = torch.Generator().manual_seed(2)
    current = (torch.rand(8, 50, 64, generator=gen, dtype=dtype) * 0.3).requires_grad_()
    _, sparse = saved_bytes(lambda: snf.lif(current, beta=0.9, window=1e6), current)
    history = current.numel() * current.element_size()
    assert sparse <= 1.1 * history, f"saved {sparse} bytes for a {history}-byte history"
