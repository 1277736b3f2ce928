import contextlib
import os

import pytest
import torch

pytest.importorskip("triton")

import snnopt.functional as SF  # noqa: E402
import snnopt.nn as snn  # noqa: E402
from snnopt import InvalidArgumentError, InvalidTypeError  # noqa: E402
from snnopt.codegen import kernel_cache, triton_lif  # noqa: E402
from snnopt.spec import LifSpec  # noqa: E402


def test_unknown_backend_is_rejected():
    with pytest.raises(InvalidArgumentError, match="backend"):
        SF.lif(torch.rand(2, 3, 4), beta=0.9, backend="cuda")
    with pytest.raises(InvalidArgumentError, match="backend"):
        snn.LinearLIF(3, 2, backend="gpu")


def test_triton_on_cpu_tensors_needs_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(InvalidArgumentError, match="TRITON_INTERPRET=1"):
        SF.lif(torch.rand(2, 3, 4), beta=0.9, backend="triton")


def test_half_precision_needs_the_triton_backend():
    with pytest.raises(InvalidTypeError, match="Triton backend"):
        SF.lif(torch.rand(2, 3, 4, dtype=torch.bfloat16), beta=0.9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_backend_refuses_cuda_tensors():
    with pytest.raises(InvalidArgumentError, match="backend='cpu'"):
        SF.lif(torch.rand(2, 3, 4, device="cuda"), beta=0.9, backend="cpu")


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors on Triton need the interpreter")
def test_modules_take_the_backend_option():
    torch.manual_seed(0)
    layers = [snn.LinearLIF(5, 4, recurrent=True, backend=b, dtype=torch.float64) for b in ("cpu", "triton")]
    layers[1].load_state_dict(layers[0].state_dict())
    x = (torch.rand(2, 6, 5) < 0.5).double()
    outs = [layer(x) for layer in layers]
    torch.testing.assert_close(outs[0], outs[1])
    grads = [torch.autograd.grad(o.sum() + 0 * o.sum(), list(layer.parameters()), allow_unused=True)
             for o, layer in zip(outs, layers)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_emit_kernels_writes_readable_source(tmp_path):
    spec = LifSpec(reset="zero", cuba=True, surrogate=LifSpec().surrogate)
    paths = triton_lif.emit_kernels(spec, tmp_path / "kernels", dtype=torch.bfloat16)
    assert len(paths) == 1 and paths[0].exists()
    text = paths[0].read_text()
    assert "def _lif_fwd_kernel" in text and "def _lif_bwd_kernel" in text and "tl.float32" in text
    assert "beta * v * (1.0 - s_prev) + drive" in text  # reset folded in
    assert "tl.full([], 100.0, ACC)" in text  # surrogate parameter folded in
    assert triton_lif.emit_kernels(spec, tmp_path / "kernels", dtype=torch.bfloat16) == paths  # same name


def test_kernels_are_cached_per_spec_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("SNNOPT_CACHE_DIR", str(tmp_path))
    spec = LifSpec(surrogate=LifSpec().surrogate, window=0.3)
    first = triton_lif.kernels(spec, torch.float32)
    assert triton_lif.kernels(spec, torch.float32) is first
    files = list(tmp_path.glob("lif_kernels_*.py"))
    assert len(files) == 1 and files[0].read_text() == triton_lif.kernel_source(spec, torch.float32)
    assert not list(tmp_path.glob("*.tmp"))
    other = triton_lif.kernels(LifSpec(window=0.25), torch.float32)
    assert other is not first and len(list(tmp_path.glob("lif_kernels_*.py"))) == 2


def test_unwritable_cache_folder_falls_back_to_a_temp_dir(tmp_path, monkeypatch):
    blocked = tmp_path / "file"
    blocked.write_text("")
    monkeypatch.setenv("SNNOPT_CACHE_DIR", str(blocked / "sub"))
    folder = kernel_cache.cache_dir()
    assert folder != blocked / "sub" and os.access(folder, os.W_OK)


def test_import_snnopt_needs_no_triton():
    import subprocess
    import sys
    code = ("import sys; sys.modules['triton'] = None; import snnopt, snnopt.functional as SF, torch; "
            "print(SF.lif(torch.rand(1, 2, 3), beta=0.9).shape)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("backward", ["exact", "sparse"])
def test_custom_op_contract_and_torch_compile(backward, device):
    from snnopt import triton_ops  # noqa: F401  (registers the ops)
    x = torch.rand(2, 3, 4, dtype=torch.float64, device=device, requires_grad=True)
    w = torch.rand(5, 4, dtype=torch.float64, device=device, requires_grad=True)
    beta, theta = torch.full((5,), 0.9, dtype=torch.float64, device=device), torch.ones(5, dtype=torch.float64,
                                                                                         device=device)
    args = (x, w, None, None, beta, theta, None, torch.zeros(2, 5, dtype=torch.float64, device=device), None, None,
            "subtract", True, "superspike", 100.0, False, backward, 0.5, True, True)
    result = torch.library.opcheck(torch.ops.snnopt.lif_triton.default, args,
                                   test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    assert set(result.values()) == {"SUCCESS"}

    def layer(x, w):
        return SF.linear_lif(x, w, beta=0.9, backward=backward, window=0.5, backend="triton", input_active=None)

    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    grads = [torch.autograd.grad(fn(x, w).sum(), [x, w]) for fn in (layer, compiled)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


class _OnGpu:
    """Stands in for a CUDA tensor on GPU ``index`` (what launch_device reads of it)."""

    is_cuda = True

    def __init__(self, index):
        self.device = torch.device("cuda", index)


def test_launch_device_switches_to_the_tensor_s_gpu_only_where_another_is_current(monkeypatch):
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda device: entered.append(device) or contextlib.nullcontext())
    with triton_lif.launch_device(_OnGpu(1)):
        pass
    assert entered == [torch.device("cuda", 1)]
    with triton_lif.launch_device(_OnGpu(0)), triton_lif.launch_device(torch.zeros(1)):  # current, and CPU
        pass
    assert entered == [torch.device("cuda", 1)]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors on Triton need the interpreter")
def test_triton_layers_launch_on_their_input_s_device(monkeypatch):
    # Triton launches on the current GPU whatever the tensors' device: the forward op runs under
    # launch_device of its input, the backward under that of its state (same device).
    guarded = []
    real = triton_lif.launch_device
    monkeypatch.setattr(triton_lif, "launch_device", lambda t: guarded.append(t) or real(t))
    x = (torch.rand(2, 6, 5) < 0.4).float()
    w = torch.rand(4, 5, requires_grad=True)
    out = SF.linear_lif(x, w, beta=0.9, window=0.5, backend="triton")
    assert len(guarded) == 1 and guarded[0] is x
    out.sum().backward()
    assert len(guarded) == 2 and guarded[1].shape == (2, 4)  # the initial state (B, N)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors on Triton need the interpreter")
@pytest.mark.parametrize("backward", ["sparse", "exact"])
def test_autocast_leaves_the_triton_layer_in_its_input_dtype(backward):
    # Inside the op autocast would run the GEMMs in bfloat16: another current, other spikes.
    gen = torch.Generator().manual_seed(4)
    x = (torch.rand(3, 10, 24, generator=gen) < 0.3).float()
    w0 = torch.randn(12, 24, generator=gen) * 0.5
    upstream = torch.randn(3, 10, 12, generator=gen)

    def step(autocast):
        w = w0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = SF.linear_lif(x, w, beta=0.9, window=0.4, backward=backward, backend="triton")
            (out * upstream).sum().backward()
        return out, w.grad

    (out, grad), (expected_out, expected_grad) = step(True), step(False)
    assert out.dtype == torch.float32
    assert torch.equal(out, expected_out) and torch.equal(grad, expected_grad)
