"""``triton_lif.KernelTuning`` changes how the Triton kernels run, never what they compute.

Each tuning a benchmark may try (unpipelined or deeper-pipelined sweeps, smaller neuron blocks,
ordered atomics, the two-sweep compaction, other event-pair block sizes, one entry or many per
event-pair program, pairs merged per (b, j) before their atomics, either weight-gradient route
(which changes the order of the sums: equal within float32 rounding), one or several input rows
per event-listing program) against the shipped one, on the paths that use it: the compact event
route (the weight gradient's atomics, the restricted input gradient), the compact dense weight
route (reverse sweep), a membrane loss's full sweep, the flag sweep of a sparse layer with zero
reset, and the exact sweep. (These layers overflow the one-pass compaction's staging: its
gathering program, ``gather_slots``, is compared in test_triton_compact.py.) Triton's interpreter
on CPU, the compiled kernels on a GPU (where the atomics' order may differ, hence a float32-rounding
tolerance on the gradients).
"""

import pytest
import torch

pytest.importorskip("triton")

import snnopt.functional as SF  # noqa: E402
from snnopt.codegen import triton_lif  # noqa: E402
from snnopt.errors import InvalidArgumentError  # noqa: E402
from snnopt.surrogate import Surrogate  # noqa: E402

TUNINGS = [dict(sweep_stages=1), dict(sweep_stages=4), dict(max_block=16), dict(one_pass_compaction=False),
           dict(pair_block=32), dict(pair_entries=1), dict(pair_entries=64), dict(event_tile=16), dict(event_tile=64),
           dict(weight_grad_route="pairs"), dict(weight_grad_route="dense"),
           dict(pair_grouping=True, pair_entries=16), dict(pair_grouping=True, pair_entries=64),
           dict(atomic_sem="acq_rel", sweep_stages=2, max_block=32, one_pass_compaction=False, pair_block=256)]


def _run(x, w, beta, *, backward, reset, membrane_loss, input_active=None):
    w = w.detach().clone().requires_grad_()
    x = x.detach().clone().requires_grad_(input_active is not None)
    out = SF.linear_lif(x, w, beta=beta, reset=reset, surrogate=Surrogate("superspike", 10.0), window=0.5,
                        backward=backward, return_membrane=membrane_loss, backend="triton", input_active=input_active)
    spikes = out.spikes if membrane_loss else out
    upstream = torch.randn(spikes.shape, generator=torch.Generator().manual_seed(3)).to(x.device)
    loss = (spikes * upstream).sum() + (out.membrane.sum() if membrane_loss else 0.0)
    grads = torch.autograd.grad(loss, [w] + ([x] if input_active is not None else []))
    return (spikes.detach(), *grads)


@pytest.mark.parametrize("backward, reset, membrane_loss, restricted_input_grad, pairs", [
    ("sparse", "subtract", False, False, True),  # compact event route: the weight gradient's atomics
    ("sparse", "subtract", False, True, True),   # and the input gradient at listed entries
    ("sparse", "subtract", False, True, False),  # compact dense weight route: scatter, reverse sweep, GEMM
    ("sparse", "subtract", True, False, True),   # a membrane loss: the full reverse sweep from the lists
    ("sparse", "zero", False, False, True),      # per-entry flags and the sparse sweep
    ("exact", "subtract", False, False, True),   # exact sweep
])
def test_every_tuning_computes_the_same(backward, reset, membrane_loss, restricted_input_grad, pairs, device,
                                        monkeypatch):
    # Tiny shapes: the cost model would pick the dense GEMM; the event route is the one with atomics.
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: pairs)
    gen = torch.Generator().manual_seed(0)
    batch, steps, features, neurons = 3, 9, 12, 40  # 40 neurons: partial blocks at every block size
    x = (torch.rand(batch, steps, features, generator=gen) < 0.4).float().to(device)
    w = ((torch.rand(neurons, features, generator=gen) - 0.3) * 0.6).to(device)
    beta = (torch.rand(neurons, generator=gen) * 0.3 + 0.6).to(device)
    # Listed input entries (as an upstream sparse layer's active list would be): a sorted subset.
    listed = (torch.randperm(x.numel(), generator=gen)[:40].sort().values.to(device)
              if restricted_input_grad else None)
    run = dict(backward=backward, reset=reset, membrane_loss=membrane_loss, input_active=listed)
    shipped = _run(x, w, beta, **run)
    assert shipped[0].sum() > 0 and all(g.abs().sum() > 0 for g in shipped[1:])  # it spikes, gradients flow
    for changes in TUNINGS:
        with triton_lif.tuning(**changes):
            result = _run(x, w, beta, **run)
        assert torch.equal(result[0], shipped[0]), changes
        for name, ours, theirs in zip(("dL/dW", "dL/dx"), result[1:], shipped[1:]):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6 * float(theirs.abs().max()),
                                       msg=lambda m: f"{changes} {name}: {m}")


def test_tuning_is_scoped_and_checked():
    shipped = triton_lif.current_tuning()
    assert shipped == triton_lif.KernelTuning()
    with triton_lif.tuning(sweep_stages=1) as outer:
        assert triton_lif.current_tuning() is outer and outer.sweep_stages == 1
        with triton_lif.tuning(max_block=64):
            assert triton_lif.current_tuning() == triton_lif.KernelTuning(sweep_stages=1, max_block=64)
        assert triton_lif.current_tuning() is outer
    assert triton_lif.current_tuning() == shipped
    for bad in (dict(sweep_stages=0), dict(max_block=48), dict(max_block=2048), dict(atomic_sem="seq_cst"),
                dict(pair_block=16), dict(pair_block=96), dict(pair_entries=0), dict(pair_entries=12),
                dict(pair_entries=128), dict(weight_grad_route="gemm"), dict(pair_grouping=1),
                dict(one_pass_compaction=1), dict(event_tile=8),
                dict(event_tile=100), dict(gather_slots=0), dict(gather_slots=3), dict(gather_slots=128)):
        with pytest.raises(InvalidArgumentError, match=next(iter(bad))):
            triton_lif.KernelTuning(**bad)
    with pytest.raises(InvalidArgumentError, match="pair_entries >= 16"):
        triton_lif.KernelTuning(pair_grouping=True)  # with the shipped 8 entries per program
    with pytest.raises(InvalidArgumentError), triton_lif.tuning(sweep_stages=9):
        pass
    assert triton_lif.current_tuning() == shipped


@pytest.mark.parametrize("route, taken", [("pairs", "sparse_backward"), ("dense", "reverse_sweep")])
def test_a_forced_weight_grad_route_is_taken(route, taken, device, monkeypatch):
    # The cost model would pick the other route: the tuning decides.
    monkeypatch.setattr(triton_lif, "events_are_cheaper", lambda *args: route == "dense")
    calls = []

    def counted(name):
        real = getattr(triton_lif, name)
        return lambda *args, **kwargs: calls.append(name) or real(*args, **kwargs)
    for name in ("sparse_backward", "reverse_sweep"):
        monkeypatch.setattr(triton_lif, name, counted(name))
    gen = torch.Generator().manual_seed(1)
    x = (torch.rand(2, 6, 10, generator=gen) < 0.4).float().to(device)
    w = ((torch.rand(12, 10, generator=gen) - 0.3) * 0.8).to(device)
    with triton_lif.tuning(weight_grad_route=route):
        forced = _run(x, w, 0.8, backward="sparse", reset="subtract", membrane_loss=False)
    assert calls == [taken]
    shipped = _run(x, w, 0.8, backward="sparse", reset="subtract", membrane_loss=False)  # the other route
    assert calls == [taken, ({"sparse_backward", "reverse_sweep"} - {taken}).pop()]
    assert torch.equal(forced[0], shipped[0]) and forced[1].abs().sum() > 0
    torch.testing.assert_close(forced[1], shipped[1], rtol=1e-6, atol=1e-6 * float(shipped[1].abs().max()))
