"""ONNX export of an optimized module's inference forward, written directly with ``onnx.helper``.

Each ``fused_layer`` call of the optimized graph becomes one node of the custom domain ``snnopt``
(``lif_0``, ``cuba_lif_1``, ``leaky_integrator_2`` …) whose definition travels in the model as a
*model-local function*: its body is standard ONNX — the input current (``MatMul`` + ``Add`` for a
linear layer) and a ``Scan`` over the time axis carrying the membrane, the previous spike and, for
CuBa, the synaptic current. onnxruntime inlines such functions, so a stock runtime runs the model
with any batch size and number of steps. The node's attributes repeat what ``snnopt.explain``
reports (reset, surrogate, backward mode, window) so a reader of the ``.onnx`` file sees them.

Modes (``mode=``):

* ``"function"`` (default): the custom node + local function above;
* ``"scan"``: the same ``Scan`` placed inline in the main graph (for tools that do not read
  local functions);
* ``"unrolled"``: one set of elementwise nodes per time step, for the traced number of steps
  only (for runtimes without ``Scan``).

The step follows :mod:`snnopt.codegen.reference` operation by operation (same operand order, same
rounding), so spikes agree exactly with the torch module: ``v = (β·v + I) − θ·s`` (subtract),
``v = (β·v)·(1 − s) + I`` (zero), ``s = H(v − θ)``.

Other graph nodes are translated through a small table (:data:`_FUNCTIONS`, :data:`_METHODS`,
:data:`_MODULES`): elementwise arithmetic, matmul/linear, slicing, stack/cat, reductions over
time, ``nn.Linear``/``LayerNorm``/``BatchNorm1d``/``Dropout``, recognised spike functions.
Anything else raises :class:`ExportError` naming the node and its source line. The module is
exported in eval mode (dropout off, batch norm from running statistics), as inference runs it.

Example::

    >>> export_onnx(snnopt.optimize(model, x), (x,), "seed.onnx")
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from snnopt.errors import SnnoptError
from snnopt.functional.fused import fused_layer

DOMAIN = "snnopt"
OPSET = 18
MODES = ("function", "scan", "unrolled")


class ExportError(SnnoptError):
    """The module cannot be exported to ONNX (the message says which node and why)."""


def _onnx():
    try:
        import onnx
    except ImportError as error:
        raise ExportError("ONNX export needs the onnx package: pip install 'snnopt[onnx]'") from error
    return onnx


# --------------------------------------------------------------------------------- node builder


@dataclass
class _Builder:
    """Collects nodes (and, in the main graph, initializers) with unique value names."""

    prefix: str = ""
    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    names: dict = field(default_factory=dict)

    def fresh(self, hint: str) -> str:
        hint = self.prefix + "".join(c if c.isalnum() or c == "_" else "_" for c in hint)
        name, count = hint, self.names.get(hint, 0)
        while name in self.names and (name != hint or count):
            count += 1
            name = f"{hint}_{count}"
        self.names[hint] = count + 1
        self.names.setdefault(name, 1)
        return name

    def op(self, op_type: str, inputs, outputs: int = 1, hint: Optional[str] = None, domain: str = "", **attrs):
        from onnx import helper

        names = [self.fresh(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=names[0], domain=domain, **attrs))
        return names[0] if outputs == 1 else names

    def const(self, value, dtype, hint: str = "const") -> str:
        from onnx import numpy_helper

        array = np.asarray(value, dtype=dtype)
        return self.op("Constant", [], hint=hint, value=numpy_helper.from_array(array))

    def ints(self, values, hint: str = "ints") -> str:
        return self.const(np.asarray(values, dtype=np.int64), np.int64, hint)


def _np_dtype(tensor: torch.Tensor):
    return torch.empty((), dtype=tensor.dtype).numpy().dtype


def _onnx_dtype(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


# --------------------------------------------------------------------------------- fused layers


@dataclass
class _LayerConfig:
    index: int
    kind: str
    spiking: bool
    reset: str
    fire_at_threshold: bool
    time_dim: int
    input_scale: float
    cuba: bool
    recurrent: bool
    linear: bool
    bias: bool
    rank: int
    steps: int
    dtype: object
    attributes: dict


def _layer_config(node: fx.Node, index: int, x_value: torch.Tensor, report_layer) -> _LayerConfig:
    kw = node.kwargs
    spiking = kw.get("spiking", True)
    cuba = kw.get("alpha") is not None
    kind = ("cuba_lif" if cuba else "lif") if spiking else "leaky_integrator"
    time_dim = kw.get("time_dim", 1)
    attributes = {"kind": kind}
    if spiking:
        attributes.update(reset=kw.get("reset", "subtract"), surrogate=str(kw.get("surrogate", "")),
                          backward=kw.get("backward", "sparse"), window=float(kw.get("window", 0.2)),
                          fire_at_threshold=int(bool(kw.get("fire_at_threshold", False))))
    if report_layer is not None:
        attributes.update(beta=str(report_layer.beta), source=report_layer.source or "")
        if spiking:
            attributes["threshold"] = str(report_layer.threshold)
    args = list(node.args) + [None] * (4 - len(node.args))
    return _LayerConfig(index=index, kind=kind, spiking=spiking, reset=kw.get("reset", "subtract") if spiking else "none",
                        fire_at_threshold=bool(kw.get("fire_at_threshold", False)), time_dim=time_dim,
                        input_scale=float(kw.get("input_scale", 1.0)), cuba=cuba, recurrent=args[3] is not None,
                        linear=args[1] is not None, bias=args[2] is not None, rank=x_value.dim(),
                        steps=x_value.shape[time_dim], dtype=_np_dtype(x_value), attributes=attributes)


def _step(b: _Builder, cfg: _LayerConfig, v, s, syn, current, beta, theta, alpha, recurrent_t):
    """One time step, as snnopt.codegen.reference writes it; returns (v, s, syn)."""
    drive = current
    if cfg.recurrent:
        drive = b.op("Add", [current, b.op("MatMul", [s, recurrent_t])], hint="drive")
    if cfg.cuba:
        syn = b.op("Add", [b.op("Mul", [alpha, syn]), drive], hint="syn")
        drive = syn
    if cfg.reset == "subtract":
        v = b.op("Sub", [b.op("Add", [b.op("Mul", [beta, v]), drive]), b.op("Mul", [theta, s])], hint="v")
    elif cfg.reset == "zero":
        keep = b.op("Sub", [b.const(1.0, cfg.dtype, "one"), s])
        v = b.op("Add", [b.op("Mul", [b.op("Mul", [beta, v]), keep]), drive], hint="v")
    else:
        v = b.op("Add", [b.op("Mul", [beta, v]), drive], hint="v")
    s = _fire(b, cfg, v, theta)
    return v, s, syn


def _fire(b: _Builder, cfg: _LayerConfig, v, theta):
    if not cfg.spiking:
        return b.op("Mul", [v, b.const(0.0, cfg.dtype, "zero")], hint="s")
    compare = "GreaterOrEqual" if cfg.fire_at_threshold else "Greater"
    return b.op("Cast", [b.op(compare, [v, theta])], hint="s", to=_onnx_dtype(cfg.dtype))


def _layer_body(b: _Builder, cfg: _LayerConfig, x, weight, bias, recurrent, beta, theta, alpha, unrolled: bool):
    """Nodes computing (spikes, membrane), both batch-first, from the layer's inputs."""
    from onnx import helper

    if cfg.time_dim == 0:
        x = b.op("Transpose", [x], perm=[1, 0] + list(range(2, cfg.rank)), hint="batch_first")
    if cfg.linear:
        if cfg.input_scale != 1.0:
            scale = b.const(cfg.input_scale, cfg.dtype, "input_scale")
            weight = b.op("Mul", [weight, scale])
            bias = b.op("Mul", [bias, scale]) if cfg.bias else None
        current = b.op("MatMul", [x, b.op("Transpose", [weight], perm=[1, 0])], hint="current")
        if cfg.bias:
            current = b.op("Add", [current, bias], hint="current")
    else:
        current = x
        if cfg.input_scale != 1.0:
            current = b.op("Mul", [x, b.const(cfg.input_scale, cfg.dtype, "input_scale")], hint="current")
    recurrent_t = b.op("Transpose", [recurrent], perm=[1, 0]) if cfg.recurrent else None
    if not cfg.spiking:
        theta = None
    first = b.op("Gather", [current, b.const(0, np.int64, "step0")], axis=1, hint="first_step")
    zeros = b.op("ConstantOfShape", [b.op("Shape", [first])], hint="zeros",
                 value=helper.make_tensor("zero", _onnx_dtype(cfg.dtype), [1], [0.0]))
    v0 = zeros
    s0 = _fire(b, cfg, v0, theta)
    syn0 = zeros if cfg.cuba else None
    if unrolled:
        spikes, membranes, v, s, syn = [], [], v0, s0, syn0
        for t in range(cfg.steps):
            current_t = b.op("Gather", [current, b.const(t, np.int64, "t")], axis=1, hint=f"current_t{t}")
            v, s, syn = _step(b, cfg, v, s, syn, current_t, beta, theta, alpha, recurrent_t)
            spikes.append(b.op("Unsqueeze", [s, b.ints([1])]))
            membranes.append(b.op("Unsqueeze", [v, b.ints([1])]))
        return (b.op("Concat", spikes, axis=1, hint="spikes"), b.op("Concat", membranes, axis=1, hint="membrane"))
    body = _Builder(prefix=b.prefix + "step_")
    state_in = ["v_in", "s_in"] + (["syn_in"] if cfg.cuba else [])
    v, s, syn = _step(body, cfg, "v_in", "s_in", "syn_in" if cfg.cuba else None, "current_t", beta, theta, alpha,
                      recurrent_t)
    outs = [body.op("Identity", [v], hint="v_out"), body.op("Identity", [s], hint="s_out")]
    if cfg.cuba:
        outs.append(body.op("Identity", [syn], hint="syn_out"))
    outs += [body.op("Identity", [s], hint="spike_t"), body.op("Identity", [v], hint="membrane_t")]
    elem = _onnx_dtype(cfg.dtype)
    graph = helper.make_graph(
        body.nodes, f"{cfg.kind}_{cfg.index}_step",
        [helper.make_tensor_value_info(name, elem, None) for name in state_in + ["current_t"]],
        [helper.make_tensor_value_info(name, elem, None) for name in outs])
    results = b.op("Scan", [v0, s0] + ([syn0] if cfg.cuba else []) + [current], outputs=len(outs), hint="scan",
                   body=graph, num_scan_inputs=1, scan_input_axes=[1], scan_output_axes=[1, 1])
    return results[-2], results[-1]


def _layer_function(cfg: _LayerConfig, inputs: list):
    """The model-local FunctionProto ``snnopt.<kind>_<index>`` and its formal input names."""
    from onnx import helper

    body = _Builder()
    formal = {name: name for name in inputs}
    spikes, membrane = _layer_body(body, cfg, formal["x"], formal.get("weight"), formal.get("bias"),
                                   formal.get("recurrent_weight"), formal["beta"], formal.get("threshold"),
                                   formal.get("alpha"), unrolled=False)
    body.nodes.append(helper.make_node("Identity", [spikes], ["spikes"]))
    body.nodes.append(helper.make_node("Identity", [membrane], ["membrane"]))
    return helper.make_function(DOMAIN, f"{cfg.kind}_{cfg.index}", inputs, ["spikes", "membrane"], body.nodes,
                                [helper.make_opsetid("", OPSET)], attributes=sorted(cfg.attributes))


# --------------------------------------------------------------------------------- the graph


class _Recorder(fx.Interpreter):
    """Runs the graph once and keeps every node's value (shapes, dtypes, ranks for translation)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.values: dict = {}

    def run_node(self, n):
        result = super().run_node(n)
        self.values[n] = result
        return result


def _source(node: fx.Node) -> str:
    from snnopt.passes.trace import source_of

    where = source_of(node)
    return f" (from {where})" if where else ""


class _Translator:
    def __init__(self, gm: fx.GraphModule, inputs: tuple, mode: str):
        self.gm, self.mode = gm, mode
        self.b = _Builder()
        self.functions: list = []
        self.env: dict = {}
        recorder = _Recorder(gm)
        with torch.no_grad():
            recorder.run(*inputs)
        self.values = recorder.values
        self.inputs = inputs
        self.graph_inputs: list = []
        self.graph_outputs: list = []
        report = getattr(gm, "snnopt_report", None)
        self.report_layers = {layer.node: layer for layer in report.layers} if report is not None else {}
        self.layer_count = 0

    # ------------------------------------------------------------------ helpers
    def value(self, arg):
        """ONNX name (tensor), python constant, or nested list of those, for an fx argument."""
        if isinstance(arg, fx.Node):
            return self.env[arg]
        if isinstance(arg, (list, tuple)):
            return type(arg)(self.value(a) for a in arg)
        return arg

    def tensor_arg(self, arg, like: Optional[torch.Tensor] = None) -> str:
        """``arg`` as an ONNX tensor name; Python numbers become constants of ``like``'s dtype."""
        if isinstance(arg, fx.Node):
            name = self.env[arg]
            if not isinstance(name, str):
                raise ExportError(f"node {arg.name} is not a tensor")
            return name
        dtype = _np_dtype(like) if isinstance(like, torch.Tensor) else np.float32
        return self.b.const(arg, dtype, "scalar")

    def like(self, args) -> Optional[torch.Tensor]:
        for a in args:
            if isinstance(a, fx.Node) and isinstance(self.values.get(a), torch.Tensor):
                return self.values[a]
        return None

    def initializer(self, name: str, tensor: torch.Tensor) -> str:
        from onnx import numpy_helper

        onnx_name = self.b.fresh(name)
        self.b.initializers.append(numpy_helper.from_array(tensor.detach().cpu().numpy(), onnx_name))
        return onnx_name

    # ------------------------------------------------------------------ nodes
    def run(self):
        for node in self.gm.graph.nodes:
            try:
                self.env[node] = self.translate(node)
            except ExportError:
                raise
            except Exception as error:
                raise ExportError(f"ONNX export failed at node {node.name} ({node.format_node()}){_source(node)}: "
                                  f"{type(error).__name__}: {error}") from error

    def translate(self, node: fx.Node):
        if node.op == "placeholder":
            index = len(self.graph_inputs)
            if index >= len(self.inputs):
                return None  # an optional argument left at its default
            self.graph_inputs.append((node.name, self.inputs[index]))
            return node.name
        if node.op == "get_attr":
            value = self.values[node]
            return self.initializer(node.target, value) if isinstance(value, torch.Tensor) else value
        if node.op == "output":
            leaves, _ = tree_flatten(node.args[0])
            for leaf in leaves:
                if isinstance(leaf, fx.Node) and isinstance(self.values.get(leaf), torch.Tensor):
                    self.graph_outputs.append((self.env[leaf], self.values[leaf]))
            return None
        if node.op == "call_function" and node.target is fused_layer:
            return self.fused(node)
        if node.op == "call_function" and getattr(node.target, "autograd_function", None) is not None:
            return self.spike_function(node)
        table = {"call_function": _FUNCTIONS, "call_method": _METHODS}.get(node.op)
        if node.op == "call_module":
            module = self.gm.get_submodule(node.target)
            handler = _MODULES.get(type(module))
            if handler is None:
                raise ExportError(f"ONNX export: no translation for module {node.target} ({type(module).__name__})"
                                  f"{_source(node)}")
            return handler(self, node, module)
        handler = table.get(node.target) if table is not None else None
        if handler is None:
            raise ExportError(f"ONNX export: no translation for {node.op} {getattr(node.target, '__name__', node.target)}"
                              f" (node {node.name}){_source(node)}")
        return handler(self, node)

    def fused(self, node: fx.Node):
        x_value = self.values[node.args[0]]
        cfg = _layer_config(node, self.layer_count, x_value, self.report_layers.get(node.name))
        self.layer_count += 1
        kw = node.kwargs
        args = list(node.args) + [None] * (4 - len(node.args))
        actual = {"x": self.tensor_arg(args[0])}
        for key, arg in zip(("weight", "bias", "recurrent_weight"), args[1:4]):
            if arg is not None:
                actual[key] = self.tensor_arg(arg)
        like = x_value
        actual["beta"] = self.tensor_arg(kw["beta"], like)
        if cfg.spiking:
            actual["threshold"] = self.tensor_arg(kw.get("threshold", 1.0), like)
        if cfg.cuba:
            actual["alpha"] = self.tensor_arg(kw["alpha"], like)
        if self.mode == "function":
            function = _layer_function(cfg, list(actual))
            self.functions.append(function)
            spikes, membrane = self.b.op(function.name, list(actual.values()), outputs=2, domain=DOMAIN,
                                         hint=function.name, **cfg.attributes)
        else:
            spikes, membrane = _layer_body(self.b, cfg, actual["x"], actual.get("weight"), actual.get("bias"),
                                           actual.get("recurrent_weight"), actual["beta"], actual.get("threshold"),
                                           actual.get("alpha"), unrolled=self.mode == "unrolled")
        return (spikes if cfg.spiking else None, membrane)

    def spike_function(self, node: fx.Node):
        info = node.meta.get("spike")
        if info is None:
            raise ExportError(f"ONNX export: the spike function in node {node.name} was not recognised "
                              f"({node.meta.get('spike_refusal', 'not probed')}){_source(node)}")
        u = self.tensor_arg(node.args[0])
        like = self.values[node.args[0]]
        shift = self.b.const(float(info.shift), _np_dtype(like), "shift")
        compare = "GreaterOrEqual" if info.fire_at_threshold else "Greater"
        return self.b.op("Cast", [self.b.op(compare, [u, shift])], to=_onnx_dtype(_np_dtype(self.values[node])),
                         hint=node.name)


# --------------------------------------------------------------------------------- op table


def _binary(op_type: str, swap: bool = False):
    def handler(tr: _Translator, node: fx.Node):
        a, b = node.args[0], node.args[1]
        if node.kwargs.get("alpha", 1) != 1:
            raise ExportError(f"ONNX export: {node.target} with alpha is not supported")
        like = tr.like([a, b])
        names = [tr.tensor_arg(a, like), tr.tensor_arg(b, like)]
        return tr.b.op(op_type, names[::-1] if swap else names, hint=node.name)
    return handler


def _unary(op_type: str):
    def handler(tr: _Translator, node: fx.Node):
        return tr.b.op(op_type, [tr.tensor_arg(node.args[0])], hint=node.name)
    return handler


def _clamp(tr: _Translator, node: fx.Node):
    """``clamp(x, min, max)`` with number bounds (snnTorch's ``beta.clamp(0, 1)``): ONNX Clip."""
    x = node.args[0]
    bounds = list(node.args[1:3]) + [None] * (3 - len(node.args))
    bounds = [node.kwargs.get(key, bound) for key, bound in zip(("min", "max"), bounds)]
    dtype = _np_dtype(tr.values[x])
    names = []
    for bound in bounds:
        if bound is not None and not isinstance(bound, (int, float)):
            raise ExportError(f"ONNX export: clamp with tensor bounds is not supported (node {node.name})"
                              f"{_source(node)}")
        names.append("" if bound is None else tr.b.const(float(bound), dtype, "clamp_bound"))
    while names and names[-1] == "":
        names.pop()
    return tr.b.op("Clip", [tr.tensor_arg(x), *names], hint=node.name)


def _identity(tr: _Translator, node: fx.Node):
    return tr.env[node.args[0]]


def _getitem(tr: _Translator, node: fx.Node):
    container, index = node.args
    held = tr.env[container]
    if not isinstance(held, str):  # a tuple of outputs (fused layer, max)
        return held[index]
    rank = tr.values[container].dim()
    items = list(index) if isinstance(index, tuple) else [index]
    if Ellipsis in items:
        at = items.index(Ellipsis)
        explicit = sum(1 for i in items if i is not None and i is not Ellipsis)
        items[at:at + 1] = [slice(None)] * (rank - explicit)
    name, axis = held, 0
    for item in items:
        if item is None:
            name = tr.b.op("Unsqueeze", [name, tr.b.ints([axis])])
            axis += 1
        elif isinstance(item, int):
            name = tr.b.op("Gather", [name, tr.b.const(item, np.int64, "index")], axis=axis)
        elif isinstance(item, slice):
            if item != slice(None):
                step = 1 if item.step is None else item.step
                start = item.start if item.start is not None else (0 if step > 0 else -1)
                stop = item.stop if item.stop is not None else (2**62 if step > 0 else -(2**62))
                name = tr.b.op("Slice", [name, tr.b.ints([start]), tr.b.ints([stop]), tr.b.ints([axis]),
                                         tr.b.ints([step])])
            axis += 1
        else:
            raise ExportError(f"ONNX export: indexing with {type(item).__name__} (node {node.name}){_source(node)}")
    return name


def _dims(node: fx.Node, rank: int, position: int = 1, key: str = "dim"):
    dim = node.kwargs.get(key, node.args[position] if len(node.args) > position else None)
    if dim is None:
        return list(range(rank))
    dims = list(dim) if isinstance(dim, (tuple, list)) else [dim]
    return [d % rank for d in dims]


def _reduce(op_type: str):
    def handler(tr: _Translator, node: fx.Node):
        rank = tr.values[node.args[0]].dim()
        keep = node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)
        return tr.b.op(op_type, [tr.tensor_arg(node.args[0]), tr.b.ints(_dims(node, rank))], keepdims=int(bool(keep)),
                       hint=node.name)
    return handler


def _max(tr: _Translator, node: fx.Node):
    rank = tr.values[node.args[0]].dim()
    if len(node.args) < 2 and "dim" not in node.kwargs:
        return tr.b.op("ReduceMax", [tr.tensor_arg(node.args[0]), tr.b.ints(list(range(rank)))], keepdims=0)
    dim = _dims(node, rank)[0]
    keep = int(bool(node.kwargs.get("keepdim", node.args[2] if len(node.args) > 2 else False)))
    x = tr.tensor_arg(node.args[0])
    return (tr.b.op("ReduceMax", [x, tr.b.ints([dim])], keepdims=keep, hint=node.name),
            tr.b.op("ArgMax", [x], axis=dim, keepdims=keep, select_last_index=0))


def _getattr(tr: _Translator, node: fx.Node):
    held = tr.env[node.args[0]]
    if node.args[1] in ("values", "indices") and isinstance(held, tuple):
        return held[0 if node.args[1] == "values" else 1]
    raise ExportError(f"ONNX export: attribute {node.args[1]!r} (node {node.name}){_source(node)}")


def _transpose(tr: _Translator, node: fx.Node):
    rank = tr.values[node.args[0]].dim()
    perm = list(range(rank))
    if node.target == "t":
        perm = perm[::-1]
    else:
        a, b = (d % rank for d in node.args[1:3])
        perm[a], perm[b] = perm[b], perm[a]
    return tr.b.op("Transpose", [tr.tensor_arg(node.args[0])], perm=perm, hint=node.name)


def _permute(tr: _Translator, node: fx.Node):
    dims = node.args[1] if isinstance(node.args[1], (tuple, list)) else node.args[1:]
    return tr.b.op("Transpose", [tr.tensor_arg(node.args[0])], perm=list(dims), hint=node.name)


def _stack(tr: _Translator, node: fx.Node, concat: bool = False):
    tensors = node.args[0]
    rank = tr.values[tensors[0]].dim() + (0 if concat else 1)
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0) % rank
    names = [tr.tensor_arg(t) for t in tensors]
    if not concat:
        names = [tr.b.op("Unsqueeze", [n, tr.b.ints([dim])]) for n in names]
    return tr.b.op("Concat", names, axis=dim, hint=node.name)


def _reshape(tr: _Translator, node: fx.Node):
    shape = tuple(tr.values[node].shape)
    return tr.b.op("Reshape", [tr.tensor_arg(node.args[0]), tr.b.ints(list(shape))], hint=node.name)


def _unsqueeze(tr: _Translator, node: fx.Node):
    rank = tr.values[node].dim()
    dim = node.kwargs.get("dim", node.args[1]) % rank
    return tr.b.op("Unsqueeze", [tr.tensor_arg(node.args[0]), tr.b.ints([dim])], hint=node.name)


def _linear_of(tr: _Translator, x: str, weight: str, bias: Optional[str], hint: str):
    out = tr.b.op("MatMul", [x, tr.b.op("Transpose", [weight], perm=[1, 0])], hint=hint)
    return tr.b.op("Add", [out, bias], hint=hint) if bias is not None else out


def _functional_linear(tr: _Translator, node: fx.Node):
    args = list(node.args) + [node.kwargs.get("bias")] * (3 - len(node.args))
    bias = tr.tensor_arg(args[2]) if args[2] is not None else None
    return _linear_of(tr, tr.tensor_arg(args[0]), tr.tensor_arg(args[1]), bias, node.name)


def _module_linear(tr: _Translator, node: fx.Node, module: torch.nn.Linear):
    weight = tr.initializer(f"{node.target}.weight", module.weight)
    bias = tr.initializer(f"{node.target}.bias", module.bias) if module.bias is not None else None
    return _linear_of(tr, tr.tensor_arg(node.args[0]), weight, bias, node.name)


def _module_layer_norm(tr: _Translator, node: fx.Node, module: torch.nn.LayerNorm):
    shape = tuple(module.normalized_shape)
    dtype = _np_dtype(tr.values[node.args[0]])
    scale = tr.initializer(f"{node.target}.weight", module.weight) if module.weight is not None else \
        tr.b.const(np.ones(shape), dtype)
    bias = tr.initializer(f"{node.target}.bias", module.bias) if module.bias is not None else tr.b.const(np.zeros(shape), dtype)
    return tr.b.op("LayerNormalization", [tr.tensor_arg(node.args[0]), scale, bias], axis=-len(shape),
                   epsilon=float(module.eps), hint=node.name)


def _module_batch_norm(tr: _Translator, node: fx.Node, module: torch.nn.BatchNorm1d):
    if module.running_mean is None:
        raise ExportError(f"ONNX export: {node.target} keeps no running statistics; inference needs them")
    x = tr.tensor_arg(node.args[0])
    channels = module.num_features
    ones = torch.ones(channels, dtype=module.running_mean.dtype)
    scale = tr.initializer(f"{node.target}.weight", module.weight if module.weight is not None else ones)
    bias = tr.initializer(f"{node.target}.bias", module.bias if module.bias is not None else ones * 0)
    mean = tr.initializer(f"{node.target}.running_mean", module.running_mean)
    var = tr.initializer(f"{node.target}.running_var", module.running_var)
    return tr.b.op("BatchNormalization", [x, scale, bias, mean, var], epsilon=float(module.eps), hint=node.name)


def _module_activation(op_type: str):
    def handler(tr: _Translator, node: fx.Node, module):
        return tr.b.op(op_type, [tr.tensor_arg(node.args[0])], hint=node.name)
    return handler


_FUNCTIONS = {
    operator.add: _binary("Add"), operator.sub: _binary("Sub"), operator.mul: _binary("Mul"),
    operator.truediv: _binary("Div"), operator.matmul: _binary("MatMul"), operator.neg: _unary("Neg"),
    torch.add: _binary("Add"), torch.sub: _binary("Sub"), torch.mul: _binary("Mul"), torch.div: _binary("Div"),
    torch.matmul: _binary("MatMul"), torch.relu: _unary("Relu"), torch.sigmoid: _unary("Sigmoid"),
    torch.tanh: _unary("Tanh"), torch.nn.functional.relu: _unary("Relu"), torch.exp: _unary("Exp"),
    torch.stack: _stack, torch.cat: lambda tr, node: _stack(tr, node, concat=True),
    operator.getitem: _getitem, getattr: _getattr, torch.nn.functional.linear: _functional_linear,
    torch.sum: _reduce("ReduceSum"), torch.mean: _reduce("ReduceMean"), torch.amax: _reduce("ReduceMax"),
    torch.clamp: _clamp,
}
_METHODS = {
    "add": _binary("Add"), "sub": _binary("Sub"), "mul": _binary("Mul"), "div": _binary("Div"),
    "matmul": _binary("MatMul"), "relu": _unary("Relu"), "sigmoid": _unary("Sigmoid"), "neg": _unary("Neg"),
    "detach": _identity, "contiguous": _identity, "clone": _identity, "t": _transpose, "transpose": _transpose,
    "permute": _permute, "sum": _reduce("ReduceSum"), "mean": _reduce("ReduceMean"), "amax": _reduce("ReduceMax"),
    "max": _max, "reshape": _reshape, "view": _reshape, "flatten": _reshape, "unsqueeze": _unsqueeze,
    "squeeze": _reshape, "clamp": _clamp,
}
_MODULES = {
    torch.nn.Linear: _module_linear, torch.nn.LayerNorm: _module_layer_norm, torch.nn.BatchNorm1d: _module_batch_norm,
    torch.nn.Dropout: lambda tr, node, module: tr.env[node.args[0]], torch.nn.Identity: lambda tr, node, m: tr.env[node.args[0]],
    torch.nn.ReLU: _module_activation("Relu"), torch.nn.Sigmoid: _module_activation("Sigmoid"),
    torch.nn.Tanh: _module_activation("Tanh"),
}


def _register_check_input_shape() -> None:
    from snnopt import compiler

    _FUNCTIONS[compiler.check_input_shape] = _identity


_register_check_input_shape()


# --------------------------------------------------------------------------------- entry point


def _dynamic_dims(gm: fx.GraphModule, mode: str) -> Optional[tuple]:
    report = getattr(gm, "snnopt_report", None)
    if mode == "unrolled" or report is None or not report.any_shape:
        return None
    time_first = any(n.target is fused_layer and n.kwargs.get("time_dim", 1) == 0 for n in gm.graph.nodes)
    return ("steps", "batch") if time_first else ("batch", "steps")


def build_model_proto(module: torch.nn.Module, example_inputs, *, mode: str = "function"):
    """The ONNX ``ModelProto`` of ``module``'s inference forward (see the module docstring)."""
    onnx = _onnx()
    from onnx import helper

    if mode not in MODES:
        raise ExportError(f"mode: expected one of {MODES}, got {mode!r}")
    if not isinstance(module, fx.GraphModule):
        raise ExportError("export_onnx: expected a module returned by snnopt.optimize (a torch.fx.GraphModule)")
    if any(getattr(n.target, "__name__", "") == "run_unchanged" for n in module.graph.nodes):
        raise ExportError("export_onnx: the model was left whole by snnopt.optimize (see snnopt.explain); there is "
                          "no graph to export — use torch.onnx.export on the model itself")
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = module.training
    module.eval()
    try:
        tr = _Translator(module, inputs, mode)
        tr.run()
    finally:
        module.train(was_training)
    dims = _dynamic_dims(module, mode)

    def info(name, tensor, dynamic):
        shape = list(tensor.shape)
        if dynamic and dims is not None:
            shape = [dims[i] if i < 2 else d for i, d in enumerate(shape)]
        elif dims is not None:
            shape = [None] * len(shape)
        return helper.make_tensor_value_info(name, _onnx_dtype(_np_dtype(tensor)), shape)

    outputs = []
    seen = set()
    for name, tensor in tr.graph_outputs:
        if name in seen or any(name == n for n, _ in tr.graph_inputs):  # an output twice / an input returned
            name = tr.b.op("Identity", [name], hint="output")
        seen.add(name)
        outputs.append(info(name, tensor, False))
    graph = helper.make_graph(tr.b.nodes, type(module).__name__,
                              [info(name, tensor, True) for name, tensor in tr.graph_inputs], outputs,
                              initializer=tr.b.initializers)
    opsets = [helper.make_opsetid("", OPSET)] + ([helper.make_opsetid(DOMAIN, 1)] if tr.functions else [])
    model = helper.make_model(graph, opset_imports=opsets, functions=tr.functions, producer_name="snnopt",
                              ir_version=9)
    model.doc_string = "snnopt-optimized SNN (inference forward); fused layers are snnopt-domain functions"
    onnx.checker.check_model(model, full_check=True)
    return model


def _compare(expected: list, got: list) -> str:
    if len(expected) != len(got):
        return f"{len(got)} outputs instead of {len(expected)}"
    for i, (e, g) in enumerate(zip(expected, got)):
        e = e.detach().cpu().numpy()
        if e.shape != g.shape:
            return f"output {i} has shape {g.shape}, expected {e.shape}"
        if np.isin(e, (0.0, 1.0)).all() and e.dtype.kind == "f" and not np.array_equal(e, g):
            return f"output {i} (spikes) differs in {int((e != g).sum())} of {e.size} entries"
        if not np.allclose(e, g, rtol=1e-4, atol=1e-5):
            return f"output {i} differs (max abs difference {float(np.abs(e - g).max()):.3g})"
    return ""


def run_onnxruntime(model_proto, inputs) -> list:
    """Outputs of ``model_proto`` under onnxruntime's CPU provider, as numpy arrays."""
    import onnxruntime

    session = onnxruntime.InferenceSession(model_proto.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {i.name: x.detach().cpu().numpy() for i, x in zip(session.get_inputs(), inputs)}
    return session.run(None, feeds)


def validate_onnx(model_proto, module: torch.nn.Module, example_inputs) -> str:
    """'' when onnxruntime reproduces ``module``'s eval-mode outputs (spikes exactly), else why not."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            leaves, _ = tree_flatten(module(*inputs))
    finally:
        module.train(was_training)
    expected = [x for x in leaves if isinstance(x, torch.Tensor)]
    return _compare(expected, run_onnxruntime(model_proto, inputs))


def export_onnx(module: torch.nn.Module, example_inputs, path=None, *, mode: str = "function",
                validate: bool = True):
    """Export an optimized module's inference forward to ONNX; returns the ``onnx.ModelProto``.

    ``mode``: ``"function"`` (default), ``"scan"`` or ``"unrolled"`` (module docstring). With
    ``validate`` (default) and onnxruntime installed, the model is run on ``example_inputs`` and
    must reproduce the module's outputs, spikes exactly, or :class:`ExportError` is raised. The
    file at ``path`` is written only after that check.

    Example::

        >>> model_proto = snnopt.export_onnx(opt, (x,), "seed.onnx")
    """
    model = build_model_proto(module, example_inputs, mode=mode)
    if validate:
        try:
            import onnxruntime  # noqa: F401
        except ImportError:
            onnxruntime = None
        if onnxruntime is not None:
            problem = validate_onnx(model, module, example_inputs)
            if problem:
                raise ExportError(f"the exported ONNX model does not reproduce the module under onnxruntime: {problem}")
    if path is not None:
        _write_atomically(Path(path), model.SerializeToString())
    return model


def _write_atomically(path: Path, data: bytes) -> None:
    import os
    import tempfile

    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


__all__ = ["export_onnx", "build_model_proto", "validate_onnx", "run_onnxruntime", "ExportError", "MODES"]
