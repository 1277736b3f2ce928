"""``snnopt.optimize`` and ``snnopt.explain``: from a user's dense SNN to an optimized module.

``optimize`` traces the model on its example inputs (:mod:`snnopt.passes.trace`), runs the pass
pipeline (:mod:`snnopt.passes.pipeline`), and keeps the rewrite only after *translation
validation*: the rewritten module, with every fused layer in exact mode, must reproduce the
original's outputs and all parameter gradients on the example inputs and on a second probe. A
layer whose rewrite disagrees is put back as written (``explain`` says so). Only then are the
fused layers switched to the requested backward mode.

Example::

    >>> opt = snnopt.optimize(model, (x,))                  # sparse backward, window 0.2
    >>> loss = opt(x).sum(); loss.backward()                # gradients land in model's parameters
    >>> print(snnopt.explain(opt))
"""

from __future__ import annotations

import contextlib
import copy
import io
import math
import time

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from snnopt.errors import InvalidArgumentError, InvalidTypeError, ModelTraceError, UnsupportedModelError
from snnopt.functional.fused import fused_layer, graph_leaf
from snnopt.passes.fuse_layers import uniform_scalar
from snnopt.passes.pipeline import PassContext, run_passes
from snnopt.passes.trace import DataDependentControlFlow, _restore, _snapshot, trace_model
from snnopt.report import FusedLayer, Report, SkippedRegion
from snnopt.spec import BACKWARD_MODES

_BACKENDS = ("auto", "cpu", "triton")


def optimize(model: torch.nn.Module, example_inputs, *, backward: str = "sparse", window: float = 0.2,
             backend: str = "auto", strict: bool = False) -> fx.GraphModule:
    """Return ``model`` with its LIF recurrences fused; shares ``model``'s parameters.

    ``example_inputs`` (a tensor or a tuple) fix the shapes the model is traced with.
    ``backward="sparse"`` (default) gives fused layers the seed paper's sparse gradient (surrogate
    zero outside ``|v-θ| < window``, reset detached); ``"exact"`` keeps the original gradients.
    ``strict=True`` raises :class:`snnopt.UnsupportedModelError` instead of leaving regions as
    written. See :func:`explain` for what was done.

    Example::

        >>> opt = optimize(model, torch.rand(8, 100, 784))
    """
    started = time.perf_counter()
    _check_arguments(model, backward, window, backend)
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    if not inputs or not all(isinstance(x, torch.Tensor) for x in inputs):
        raise InvalidTypeError("example_inputs: expected a tensor or a tuple of tensors")
    context, gm = None, None
    excluded: dict = {}
    carried = _state_between_calls(model, inputs)
    if carried:
        if strict:
            raise UnsupportedModelError(f"the model was left as written: {carried}")
        return _unchanged(model, inputs, backward, window, backend, carried, None, started,
                          note="state check: the output depends on earlier calls; nothing fused")
    try:
        gm, context = _compile(model, inputs, backward, window, backend, excluded)
    except DataDependentControlFlow as record:
        reason = str(record)
        if strict:
            raise UnsupportedModelError(f"the model was left as written: {reason}") from None
        return _unchanged(model, inputs, backward, window, backend, reason, record.where, started)
    # Translation validation, layer by layer when the whole does not agree.
    mismatch = _validate(model, gm, inputs)
    if mismatch:
        # Numbered as the matches were when layers are excluded (a match fuse_layers refused has a number too).
        fused_numbers = [match.number for match in context.fused]
        for number in fused_numbers:
            excluded[number] = f"the fused layer did not reproduce the original ({mismatch})"
        trial_excluded: dict = {}
        for number in fused_numbers:
            others = {k: v for k, v in excluded.items() if k != number}
            trial, _ = _compile(model, inputs, backward, window, backend, others)
            reason = _validate(model, trial, inputs)
            if reason:
                trial_excluded[number] = f"the fused layer did not reproduce the original ({reason})"
        gm, context = _compile(model, inputs, backward, window, backend, trial_excluded)
        if _validate(model, gm, inputs):  # layers that pass alone but not together: keep none
            gm, context = _compile(model, inputs, backward, window, backend,
                                   {n: excluded[n] for n in excluded})
            residual = _validate(model, gm, inputs)
            if residual:  # even the traced graph without any fusion differs: keep the model whole
                reason = f"the traced graph does not reproduce the model ({residual})"
                if strict:
                    raise UnsupportedModelError(f"the model was left as written: {reason}")
                return _unchanged(model, inputs, backward, window, backend, reason, None, started,
                                  note="validation: even the traced graph differs from the model; nothing fused")
    _set_backward(gm, backward)
    _keep_state_dict_keys(model, gm)
    any_shape = _accepts_any_shape(model, gm, inputs)
    if not any_shape:
        _insert_shape_checks(gm, inputs)
    report = _report(context, backward, window, backend, any_shape, inputs, started)
    gm.snnopt_report = report
    if strict and report.skipped:
        first = report.skipped[0]
        raise UnsupportedModelError(f"{len(report.skipped)} region(s) left as written; first: {first.region}"
                                    + (f" at {first.source}" if first.source else "") + f": {first.reason}")
    return gm


def explain(optimized) -> Report:
    """The :class:`snnopt.report.Report` of a module returned by :func:`optimize`."""
    report = getattr(optimized, "snnopt_report", None)
    if report is None:
        raise InvalidArgumentError("explain: expected a module returned by snnopt.optimize(); this one has no report")
    return report


# --- steps of optimize -------------------------------------------------------------------------------


def _state_between_calls(model: torch.nn.Module, inputs: tuple) -> str | None:
    """Why ``model``'s output depends on its earlier calls (state kept on the module), or None.

    A fused time loop starts from the same state on every call. A forward that reads state its
    previous call left on the module (snnTorch's ``init_hidden=True`` membrane when nothing resets
    it at the start of ``forward``) computes something else from the second call on. Two calls on
    the example inputs, without gradients and with the same random draws, must agree; the
    module's state is put back afterwards.
    """
    saved = _snapshot(model)
    # The same draws in both calls (dropout), and the caller's random state untouched, GPUs' too.
    gpus = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=gpus):
            before = _tensor_state(model)
            torch.manual_seed(0)
            first = tree_flatten(model(*inputs))[0]
            after = _tensor_state(model)
            torch.manual_seed(0)
            second = tree_flatten(model(*inputs))[0]
    except Exception:  # tracing runs the model again and reports its failure with more context
        return None
    finally:
        _restore(model, saved)
    if len(first) == len(second) and all(_same_output(a, b) for a, b in zip(first, second)):
        return None
    written = [name for name, (obj, value) in after.items()
               if name not in before or before[name][0] is not obj or not _same_output(before[name][1], value)]
    if not written:  # outputs differ without module state: randomness of its own (a generator), not ours to judge
        return None
    names = ", ".join(written)
    return (f"the model's output for the same input changes from one call to the next: its forward reads state "
            f"that the previous call left on the module ({names}); a fused time loop starts from the same state "
            f"on every call, so reset that state at the start of forward (snnTorch: utils.reset(self) or the "
            f"neuron's reset_mem(); SpikingJelly: functional.reset_net(self)) and optimize again")


def _tensor_state(model: torch.nn.Module) -> dict:
    """``{name: (tensor, copy of its values)}``: module buffers and tensor attributes, BatchNorm statistics aside."""
    state = {}
    for prefix, module in model.named_modules():
        for key, value in list(module._buffers.items()) + [(k, v) for k, v in vars(module).items()
                                                           if not k.startswith("_")]:
            if (isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)
                    and not key.startswith("running_") and key != "num_batches_tracked"):
                state.setdefault(f"{prefix}.{key}" if prefix else key, (value, value.detach().clone()))
    return state


def _same_output(a, b) -> bool:
    # The tolerance validation holds outputs to (_validate_on).
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        return _relative_error(a, b) <= 1e-5
    return not isinstance(a, torch.Tensor) and not isinstance(b, torch.Tensor) and a == b


def _check_arguments(model, backward, window, backend) -> None:
    if not isinstance(model, torch.nn.Module):
        raise InvalidTypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if backward not in BACKWARD_MODES:
        raise InvalidArgumentError(f"backward: expected one of {BACKWARD_MODES}, got {backward!r}")
    if isinstance(window, bool) or not isinstance(window, (int, float)) or not (window >= 0 and math.isfinite(window)):
        raise InvalidArgumentError(f"window: expected a finite number >= 0, got {window!r}")
    if backend not in _BACKENDS:
        raise InvalidArgumentError(f"backend: expected one of {_BACKENDS}, got {backend!r}")


def _compile(model, inputs, backward, window, backend, excluded: dict):
    try:
        gm, leaves, records = trace_model(model, inputs)
    except DataDependentControlFlow:
        raise
    except Exception as error:
        raise ModelTraceError(f"the model failed on the example inputs while tracing: {type(error).__name__}: "
                              f"{error}") from error
    # Fused layers are validated with exact gradients; the requested mode is set afterwards.
    context = PassContext(backward="exact", requested_backward=backward, window=float(window), backend=backend,
                          excluded_layers=dict(excluded))
    for record in records:
        context.skipped.append(SkippedRegion(f"module {record.module_path}", str(record), record.where))
    run_passes(gm, context)
    context.backward = backward
    return gm, context


def _keep_state_dict_keys(model: torch.nn.Module, gm: fx.GraphModule) -> None:
    """Give ``gm`` every parameter and buffer of ``model`` at its name, the same tensor objects.

    fx copies only what the graph reads; the rest (a β buffer folded into a constant, an unused
    parameter) must still be in ``state_dict`` and ``named_parameters`` so that checkpoints and
    optimisers see the same model.
    """
    def owner(path: str) -> torch.nn.Module:
        module = gm
        for part in path.split(".")[:-1] if path else []:
            if part not in module._modules:
                module.add_module(part, torch.nn.Module())
            module = module._modules[part]
        return module

    for name, parameter in model.named_parameters(remove_duplicate=False):
        target = owner(name)
        leaf = name.rsplit(".", 1)[-1]
        if target._parameters.get(leaf) is not parameter:
            target._parameters[leaf] = parameter
    for module_name, module in model.named_modules():
        for leaf, buffer in module._buffers.items():
            name = f"{module_name}.{leaf}" if module_name else leaf
            target = owner(name)
            if target._buffers.get(leaf) is not buffer:
                target.register_buffer(leaf, buffer, persistent=leaf not in module._non_persistent_buffers_set)


def _set_backward(gm: fx.GraphModule, backward: str) -> None:
    for node in gm.graph.nodes:
        if node.target is fused_layer and node.kwargs.get("spiking", True):
            node.kwargs = {**node.kwargs, "backward": backward}
    gm.recompile()


def _flat_tensors(value) -> list:
    leaves, _ = tree_flatten(value)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


_PROBE_BATCH = 8  # validation runs forward+backward of both models twice: a few samples are enough


def _probe_inputs(inputs) -> list:
    generator = torch.Generator().manual_seed(7)
    if all(x.dim() >= 1 and x.shape[0] > _PROBE_BATCH for x in inputs):
        inputs = tuple(x[:_PROBE_BATCH] for x in inputs)
    probes = [inputs]
    second = []
    for x in inputs:
        if x.is_floating_point() and x.numel():
            values = x.detach()
            if bool(((values == 0) | (values == 1)).all()):
                rate = float(values.mean().clamp(0.01, 0.9))
                second.append((torch.rand(x.shape, generator=generator, device="cpu") < rate).to(x.dtype).to(x.device))
            else:
                second.append((torch.randn(x.shape, generator=generator, dtype=x.dtype, device="cpu") * values.std()
                               + values.mean()).to(x.device))
        else:
            second.append(x)
    probes.append(tuple(second))
    return probes


def _run_with_gradients(module, inputs, params, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        outputs = _flat_tensors(module(*inputs))
    float_outputs = [o for o in outputs if o.is_floating_point()]
    weights_gen = torch.Generator().manual_seed(seed + 1)
    loss = sum((o * torch.rand(o.shape, generator=weights_gen, dtype=o.dtype, device="cpu").to(o.device)).sum()
               for o in float_outputs if o.requires_grad)
    grads = [None] * len(params)
    if isinstance(loss, torch.Tensor) and loss.requires_grad:
        grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [o.detach() for o in outputs], grads


def _relative_error(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    if a.shape != b.shape:
        return math.inf
    a64, b64 = a.detach().double(), b.detach().double()
    if not (torch.isfinite(a64).all() and torch.isfinite(b64).all()):
        return 0.0 if torch.equal(torch.nan_to_num(a64), torch.nan_to_num(b64)) else math.inf
    return float((a64 - b64).norm() / max(float(b64.norm()), floor, 1e-6 * max(1.0, b64.numel() ** 0.5)))


def _quiet():
    """Keep torch.fx's printed tracebacks (a rewritten module failing on a probe) off the user's stderr."""
    return contextlib.redirect_stderr(io.StringIO())


def _validate(model, gm, inputs) -> str:
    """'' when ``gm`` reproduces ``model`` (outputs, parameter gradients) on the probes, else why not.

    The probes are a few samples of the example inputs and a random input like them; a module
    traced with its batch size baked in (some region left unfused) is checked on the full
    example inputs instead.
    """
    probes = _probe_inputs(inputs)
    with _quiet():
        reason = _validate_on(model, gm, probes)
        if reason.startswith("the rewritten module raised") and probes[0][0].shape != inputs[0].shape:
            reason = _validate_on(model, gm, [inputs])
    return reason


def _validate_on(model, gm, probes) -> str:
    params = [p for p in model.parameters() if p.requires_grad]
    state = copy.deepcopy({k: v for k, v in model.state_dict().items()})
    try:
        for number, probe in enumerate(probes):
            expected_out, expected_grads = _run_with_gradients(model, probe, params, 100 + number)
            model.load_state_dict(state)
            got_out, got_grads = _run_with_gradients(gm, probe, params, 100 + number)
            model.load_state_dict(state)
            if len(expected_out) != len(got_out):
                return "a different number of outputs"
            for i, (e, g) in enumerate(zip(expected_out, got_out)):
                if _relative_error(g, e) > 1e-5:
                    return f"output {i} differs (relative error {_relative_error(g, e):.2e})"
            # A gradient that is zero in theory (a bias before a batch norm) is float noise on both
            # sides: relative to the model's largest gradient it must still be tiny.
            scale = max([float(e.detach().double().norm()) for e in expected_grads if e is not None] or [0.0])
            for p_name, e, g in zip([n for n, p in model.named_parameters() if p.requires_grad],
                                    expected_grads, got_grads):
                if (e is None) != (g is None):
                    return f"the gradient of {p_name} is missing on one side"
                if e is not None and _relative_error(g, e, floor=1e-3 * scale) > 1e-4:
                    return f"the gradient of {p_name} differs (relative error {_relative_error(g, e):.2e})"
    except Exception as error:  # the rewritten module failing is a mismatch like any other
        model.load_state_dict(state)
        return f"the rewritten module raised {type(error).__name__}: {error}"
    return ""


def _accepts_any_shape(model, gm, inputs) -> bool:
    """Whether ``gm`` also agrees with ``model`` at another batch size and number of steps."""
    if not any(node.target is fused_layer for node in gm.graph.nodes):
        return False
    changed = []
    for x in inputs:
        if x.dim() < 2:
            return False
        repeats = [2, 2] + [1] * (x.dim() - 2)
        changed.append(x.repeat(*repeats)[: x.shape[0] + 1, : x.shape[1] + 3].contiguous())
    state = copy.deepcopy(model.state_dict())
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]), _quiet():
            torch.manual_seed(3)
            expected = _flat_tensors(model(*changed))
            model.load_state_dict(state)
            torch.manual_seed(3)
            got = _flat_tensors(gm(*changed))
    except Exception:
        model.load_state_dict(state)
        return False
    model.load_state_dict(state)
    return len(expected) == len(got) and all(_relative_error(g, e) <= 1e-5 for e, g in zip(expected, got))


@graph_leaf
def check_input_shape(x: torch.Tensor, expected: tuple, name: str) -> torch.Tensor:
    """Raise a clear error when a fixed-shape optimized module gets another input shape."""
    if tuple(x.shape) != expected:
        raise InvalidArgumentError(
            f"{name}: this optimized module was traced with shape {expected} and still depends on it (a time loop "
            f"not fused, or a state or constant sized by the batch or the number of steps), so it only accepts "
            f"that shape (got {tuple(x.shape)}); call snnopt.optimize again with example inputs of the new shape "
            f"(snnopt.explain lists what was not fused)")
    return x


def _insert_shape_checks(gm: fx.GraphModule, inputs) -> None:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, x in zip(placeholders, inputs):
        users = list(node.users)
        with gm.graph.inserting_after(node):
            checked = gm.graph.call_function(check_input_shape, (node, tuple(x.shape), node.name))
        for user in users:
            user.replace_input_with(node, checked)
    gm.recompile()


def _describe_value(value) -> str:
    if isinstance(value, fx.Node):
        held = value.meta.get("value")
        if value.op != "get_attr":
            return value.name
        if isinstance(held, torch.nn.Parameter) and held.requires_grad:
            return f"learnable ({value.target})"
        if not isinstance(held, torch.Tensor):
            return str(value.target)
        # Its numbers, and the user's name for it (a tracer's own constant has none worth showing).
        numbers = _describe_value(held.detach())
        return numbers if str(value.target).startswith("_tensor_constant") else f"{numbers} ({value.target})"
    if isinstance(value, (int, float)):
        return f"{value:g}"
    scalar = uniform_scalar(value)
    if scalar is not None:
        return f"{scalar:.6g}"
    tensor = torch.as_tensor(value)
    return f"per-neuron [{float(tensor.min()):g}, {float(tensor.max()):g}]"


def _report(context: PassContext, backward, window, backend, any_shape, inputs, started) -> Report:
    layers = []
    for number, match in enumerate(context.fused):
        spiking = match.kind != "leaky_integrator"
        layer_input = getattr(match, "input", None)
        if layer_input is None:
            how = "current stacked per step"
        elif layer_input.weight is None:
            how = "precomputed current"
        else:
            how = "linear of input (events when sparse)"
        producer = getattr(match, "input_from", None)
        gradient = "dense"
        if producer is not None and backward == "sparse":
            gradient = f"only at layer {context.fused.index(producer)}'s active entries"
        beta = match.beta if isinstance(match.beta, fx.Node) else match.beta_value
        layers.append(FusedLayer(
            index=number, kind=match.kind, recurrent=match.recurrent_weight is not None, neurons=match.neurons,
            steps=len(match.states), beta=_describe_value(beta),
            threshold=_describe_value(match.threshold) if spiking else None,
            reset=(match.reset + ("" if match.reset == "none" else (" detached" if match.detach_reset or
                                                                    backward == "sparse" else " attached")))
            if spiking else None,
            surrogate=str(match.surrogate) if spiking else None,
            backward=backward if spiking else "exact", window=float(window) if spiking and backward == "sparse" else None,
            input=how, input_gradient=gradient, source=match.source,
            node=match.fused_node.name if getattr(match, "fused_node", None) is not None else "",
            original_nodes=sorted(n.name for n in match.nodes | set(match.currents))))
    return Report(layers=layers, skipped=list(context.skipped), passes=list(context.log_lines), backward=backward,
                  window=float(window), backend=backend, any_shape=any_shape,
                  traced_shapes=[tuple(x.shape) for x in inputs], seconds=time.perf_counter() - started)


@graph_leaf
def run_unchanged(model: torch.nn.Module, *inputs):
    """The graph of a model left whole: call it as the user wrote it."""
    return model(*inputs)


class UnchangedModule(fx.GraphModule):
    """What ``optimize`` returns when the model's own forward cannot be traced.

    Its graph calls the original module; its parameters, buffers and submodules *are* the
    original's (the same dictionaries), so ``state_dict`` keys, ``named_parameters`` and
    ``train()``/``eval()`` behave exactly as on the model.
    """

    def train(self, mode: bool = True):
        super().train(mode)
        self.original.train(mode)
        return self


def _unchanged(model, inputs, backward, window, backend, reason, where, started,
               note: str = "trace: the forward decides control flow from tensor values; nothing fused"
               ) -> fx.GraphModule:
    """A GraphModule that runs ``model`` as it is (its whole forward could not be traced or fused)."""
    graph = fx.Graph()
    placeholders = [graph.placeholder(f"input_{i}") for i in range(len(inputs))]
    original = graph.get_attr("original")
    graph.output(graph.call_function(run_unchanged, (original, *placeholders)))
    holder = torch.nn.Module()
    object.__setattr__(holder, "original", model)
    gm = UnchangedModule(holder, graph, class_name=type(model).__name__ + "Unchanged")
    object.__setattr__(gm, "original", model)  # not a child: its children are gm's own, below
    gm._modules, gm._parameters, gm._buffers = model._modules, model._parameters, model._buffers
    gm.training = model.training
    gm.snnopt_report = Report(skipped=[SkippedRegion("the whole model", reason, where)], backward=backward,
                              window=float(window), backend=backend, any_shape=True,
                              traced_shapes=[tuple(x.shape) for x in inputs], seconds=time.perf_counter() - started,
                              passes=[note])
    return gm


__all__ = ["optimize", "explain"]
