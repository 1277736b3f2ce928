"""Trace a user's model into a ``torch.fx`` graph with the example inputs' concrete shapes.

Plain ``torch.fx.symbolic_trace`` cannot trace an SNN's forward: ``for t in range(x.shape[1])``
needs a real number of steps, ``torch.zeros(x.shape[0], n)`` a real batch size, and a surrogate
spike function (a ``torch.autograd.Function``) would be inlined, its surrogate backward silently
lost. :class:`ConcreteTracer` therefore carries each proxy's concrete value next to it:

* shape, dtype, device, ``len()`` and size queries answer with real values, so time loops unroll
  and state initialisations become constants of the graph (explicit zeros);
* ``Function.apply`` of any autograd Function becomes one whole ``call_function`` node
  (:func:`autograd_function_node_target`), so its backward is kept and can be probed later;
* anything that turns a tensor's *values* into Python control flow (``if s.sum() > 0``,
  ``.item()``, ``int(t)``) raises :class:`DataDependentControlFlow`: such a graph would be right
  for the example input only. The caller then keeps the module that did it as a leaf, unchanged.

After tracing every node's value on the example inputs is stored in ``node.meta["value"]`` (an
interpreter run), which the detection passes read.
"""

from __future__ import annotations

import copy
import operator
import linecache
import traceback
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import Tensor
from torch.fx.proxy import Attribute

from snnopt.functional.fused import graph_leaf

# Tensor attributes and methods that describe metadata, not values: answering them concretely is
# exactly what a shape-specialised trace means.
_METADATA_ATTRIBUTES = frozenset({"shape", "dtype", "device", "ndim", "is_cuda", "layout", "is_sparse",
                                  "requires_grad", "is_leaf", "is_floating_point"})
_METADATA_METHODS = frozenset({"size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous",
                               "element_size", "get_device", "is_floating_point"})


class DataDependentControlFlow(Exception):
    """A tensor's value decided Python control flow while tracing (``where`` is the user's source line).

    Also raised, with ``problem="in-place update"``, when a traced value is written in place into a
    tensor the trace does not see (a state created outside the traced ops): the graph could not
    reproduce that mutation.
    """

    def __init__(self, what: str, where: str, module_path: str, problem: str = "data-dependent control flow"):
        super().__init__(f"{problem}: {what} at {where}")
        self.what, self.where, self.module_path = what, where, module_path


_APPLY_NODES: dict = {}


def autograd_function_node_target(function_class):
    """The graph target that calls ``function_class.apply``: one whole node per Function call.

    Its ``autograd_function`` attribute names the class, which the spike-function probe reads.
    """
    target = _APPLY_NODES.get(function_class)
    if target is None:
        @graph_leaf
        def target(*args, **kwargs):
            return function_class.apply(*args, **kwargs)
        target.__name__ = f"apply_{function_class.__name__}"
        target.__qualname__ = target.__name__
        target.autograd_function = function_class
        _APPLY_NODES[function_class] = target
    return target


def autograd_function_of(node: fx.Node):
    """The autograd Function class a node applies, or None."""
    return getattr(node.target, "autograd_function", None) if node.op == "call_function" else None


def user_source_line(skip_internal: bool = True) -> str:
    """``file:line (code)`` of the innermost frame outside torch and snnopt."""
    for frame in reversed(traceback.extract_stack()):
        name = frame.filename.replace("\\", "/")
        if skip_internal and ("/torch/" in name or "/snnopt/passes/" in name or "/snnopt/compiler" in name):
            continue
        code = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        return f"{short_path(frame.filename)}:{frame.lineno} ({code})"
    return "<unknown>"


def short_path(path: str) -> str:
    """``path`` relative to the working directory when inside it, else its last two parts."""
    import os
    try:
        relative = os.path.relpath(path)
    except ValueError:
        relative = path
    if not relative.startswith(".."):
        return relative
    parts = path.replace("\\", "/").split("/")
    return "/".join(parts[-2:])


def _unwrap(value):
    if isinstance(value, ConcreteProxy):
        return value.value
    if isinstance(value, Attribute):
        return getattr(_unwrap(value.root), value.attr)
    if isinstance(value, (tuple, list)):
        unwrapped = [_unwrap(v) for v in value]
        return type(value)(unwrapped) if not hasattr(value, "_fields") else type(value)(*unwrapped)
    if isinstance(value, dict):
        return {k: _unwrap(v) for k, v in value.items()}
    if isinstance(value, slice):
        return slice(_unwrap(value.start), _unwrap(value.stop), _unwrap(value.step))
    return value


class _unpatched_modules:
    """Run real module calls while fx's tracing patches of ``Module.__call__``/``__getattr__`` are on."""

    def __enter__(self):
        from torch.fx import _symbolic_trace as symbolic
        self.saved = (torch.nn.Module.__call__, torch.nn.Module.__getattr__)
        torch.nn.Module.__call__ = symbolic._orig_module_call
        torch.nn.Module.__getattr__ = symbolic._orig_module_getattr
        return self

    def __exit__(self, *exc):
        torch.nn.Module.__call__, torch.nn.Module.__getattr__ = self.saved
        return False


def _resolve_attribute(root: torch.nn.Module, path: str):
    # Not getattr(): while tracing, fx patches Module.__getattr__ to hand out proxies.
    value: Any = root
    for part in path.split("."):
        if isinstance(value, torch.nn.Module):
            for table in ("_parameters", "_buffers", "_modules"):
                if part in value.__dict__[table]:
                    value = value.__dict__[table][part]
                    break
            else:
                value = object.__getattribute__(value, part)
        else:
            value = getattr(value, part)
    return value


def _writes_into_untraced_tensor(kind, target, args, kwargs) -> bool:
    if not args or isinstance(args[0], fx.Proxy) or not isinstance(args[0], Tensor):
        return "out" in kwargs and not isinstance(kwargs["out"], fx.Proxy)
    name = target if kind == "call_method" else getattr(target, "__name__", "")
    in_place = (isinstance(name, str) and name.endswith("_") and not name.endswith("__")) \
        or target in (operator.setitem, operator.iadd, operator.isub, operator.imul, operator.itruediv)
    return in_place and kind in ("call_method", "call_function")


def _holds_tensor(value) -> bool:
    if isinstance(value, Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_holds_tensor(v) for v in value)
    return False


class ConcreteProxy(fx.Proxy):
    """A proxy that also holds the value its node computes on the example inputs."""

    def __init__(self, node: fx.Node, tracer: "ConcreteTracer", value: Any = None):
        super().__init__(node, tracer)
        self.value = value

    def __getattr__(self, name: str):
        if name in _METADATA_ATTRIBUTES and isinstance(self.__dict__.get("value"), Tensor):
            return getattr(self.value, name)
        return super().__getattr__(name)

    def __len__(self) -> int:
        return len(self.value)

    def __iter__(self):
        return iter([self[i] for i in range(len(self.value))])

    def _data_dependent(self, what: str):
        raise DataDependentControlFlow(what, user_source_line(), self.tracer.current_module_path())

    def __bool__(self):
        self._data_dependent("a tensor used as a condition")

    def __int__(self):
        self._data_dependent("a tensor converted to int")

    def __float__(self):
        self._data_dependent("a tensor converted to float")

    def __index__(self):
        self._data_dependent("a tensor used as an index")


class ConcreteTracer(fx.Tracer):
    """fx tracer that runs the model on its example inputs while recording it (see module docstring)."""

    def __init__(self, leaf_module_paths: frozenset = frozenset()):
        super().__init__(autowrap_modules=(), autowrap_functions=())
        self.record_stack_traces = True
        self.leaf_module_paths = leaf_module_paths
        self._placeholder_values: list = []
        self._module_stack: list[str] = [""]
        self.grad_at_start = True
        self._buffers_at_start: dict = {}

    def current_module_path(self) -> str:
        return self._module_stack[-1]

    def is_leaf_module(self, module: torch.nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.leaf_module_paths or super().is_leaf_module(module, qualified_name)

    def call_module(self, module, forward, args, kwargs):
        path = self.path_of_module(module)
        self._module_stack.append(path)
        try:
            return super().call_module(module, forward, args, kwargs)
        finally:
            self._module_stack.pop()

    def proxy(self, node: fx.Node) -> ConcreteProxy:
        return ConcreteProxy(node, self)

    def create_arg(self, a: Any):
        # fx refers to any tensor that is a buffer *now* by the buffer's name, to be read when the graph
        # runs. A buffer the forward itself assigned while tracing (snnTorch's ``self.mem =
        # torch.zeros_like(...)`` in ``reset_mem``) holds, at that point, a value the forward computed
        # from shapes and constants; when the graph runs the buffer holds whatever the module's last
        # call (or the state restored after tracing) left there, which the graph never writes. The
        # trace-time value is what the forward used: it becomes a constant of the graph.
        if isinstance(a, Tensor) and not isinstance(a, torch.nn.Parameter) and id(a) not in self._buffers_at_start \
                and any(a is b for b in self.root.buffers()):
            return super().create_arg(a.detach().clone())
        return super().create_arg(a)

    def create_proxy(self, kind, target, args, kwargs, name=None, type_expr=None, proxy_factory_fn=None):
        if self.grad_at_start and not torch.is_grad_enabled() and kind != "placeholder":
            # fx does not record `with torch.no_grad():`; the graph would compute gradients the
            # user's code does not.
            raise DataDependentControlFlow(
                "operations run under torch.no_grad() / set_grad_enabled(False), which a traced graph cannot "
                "express", user_source_line(), self.current_module_path(), problem="gradient mode switch")
        if _writes_into_untraced_tensor(kind, target, args, kwargs):
            raise DataDependentControlFlow(
                f"{getattr(target, '__name__', target)} writes a traced value in place into a tensor the trace does "
                f"not see", user_source_line(), self.current_module_path(), problem="in-place update")
        value = self._concrete_value(kind, target, args, kwargs)
        proxy = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(proxy, ConcreteProxy):
            proxy.value = value
        if kind in ("call_function", "call_method") and not _holds_tensor(value) and value is not None:
            if kind == "call_method" and target in _METADATA_METHODS:
                return value
            if kind == "call_function" and target is getattr and args[1] in _METADATA_ATTRIBUTES:
                return value
            if isinstance(value, (torch.Size, torch.dtype, torch.device)):
                return value
            if target in (operator.eq, operator.ne, operator.is_, operator.is_not) and any(a is None for a in args):
                return value  # ``mem == None`` compares with None, not values
            raise DataDependentControlFlow(
                f"{getattr(target, '__name__', target)}() turned tensor values into a Python value",
                user_source_line(), self.current_module_path())
        return proxy

    def _concrete_value(self, kind, target, args, kwargs):
        if kind == "placeholder":
            return self._placeholder_values.pop(0) if self._placeholder_values else None
        if kind == "get_attr":
            return _resolve_attribute(self.root, target)
        values, kw_values = _unwrap(tuple(args)), _unwrap(dict(kwargs))
        if kind == "call_function":
            return target(*values, **kw_values)
        if kind == "call_method":
            return getattr(values[0], target)(*values[1:], **kw_values)
        if kind == "call_module":
            module = _resolve_attribute(self.root, target)
            with _unpatched_modules():
                return module(*values, **kw_values)
        return None

    def trace_with_values(self, root: torch.nn.Module, example_inputs: tuple) -> fx.Graph:
        self._placeholder_values = list(example_inputs)
        self.grad_at_start = torch.is_grad_enabled()
        self._buffers_at_start = {id(b): b for b in root.buffers()}  # (kept: their ids stay theirs)
        concrete_args = _defaults_beyond(root, len(example_inputs))
        with _autograd_functions_as_nodes(self):
            return self.trace(root, concrete_args=concrete_args or None)


def _defaults_beyond(root: torch.nn.Module, given: int) -> dict:
    """Forward parameters the example inputs do not cover, bound to their defaults."""
    import inspect
    parameters = list(inspect.signature(root.forward).parameters.values())
    bound = {}
    for parameter in parameters[given:]:
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        if parameter.default is parameter.empty:
            raise TypeError(f"forward() needs argument {parameter.name!r}, which the example inputs do not give")
        bound[parameter.name] = parameter.default
    return bound


def _user_autograd_functions() -> list:
    found, stack = [], list(torch.autograd.Function.__subclasses__())
    while stack:
        cls = stack.pop()
        stack.extend(cls.__subclasses__())
        if not cls.__module__.startswith("torch."):
            found.append(cls)
    return found


class _autograd_functions_as_nodes:
    """Make ``SomeFunction.apply(proxy, ...)`` record one node instead of tracing into ``forward``.

    ``Function.apply`` cannot be patched reliably (users keep ``spike = SpikeFn.apply`` bound at
    import time), but every path ends in the class's ``forward``, looked up on the class when
    called: while tracing, each user Function's ``forward`` (and ``setup_context``) is wrapped so
    that proxy arguments produce one :func:`autograd_function_node_target` node.
    """

    def __init__(self, tracer: "ConcreteTracer"):
        self.tracer = tracer
        self.saved: list = []

    def __enter__(self):
        tracer = self.tracer
        for cls in _user_autograd_functions():
            forward = cls.__dict__.get("forward")
            setup_context = cls.__dict__.get("setup_context")
            if forward is None:
                continue
            self.saved.append((cls, forward, setup_context))
            uses_ctx = not _defines_setup_context(cls)

            def traced_forward(*args, _cls=cls, _forward=forward, _uses_ctx=uses_ctx, **kwargs):
                user_args = args[1:] if _uses_ctx else args
                if any(isinstance(a, fx.Proxy) for a in (*user_args, *kwargs.values())):
                    # Function.apply runs forward under no_grad; that is not the user's grad mode.
                    with torch.enable_grad():
                        return tracer.create_proxy("call_function", autograd_function_node_target(_cls),
                                                   user_args, kwargs)
                return _forward.__func__(*args, **kwargs) if isinstance(_forward, staticmethod) else _forward(*args, **kwargs)

            cls.forward = staticmethod(traced_forward)
            if setup_context is not None and not uses_ctx:
                def traced_setup_context(ctx, inputs, output, _setup=setup_context):
                    if isinstance(output, fx.Proxy) or any(isinstance(a, fx.Proxy) for a in inputs):
                        return None
                    fn = _setup.__func__ if isinstance(_setup, staticmethod) else _setup
                    return fn(ctx, inputs, output)
                cls.setup_context = staticmethod(traced_setup_context)
        return self

    def __exit__(self, *exc):
        for cls, forward, setup_context in self.saved:
            cls.forward = forward
            if setup_context is not None:
                cls.setup_context = setup_context
        return False


def _defines_setup_context(cls) -> bool:
    for klass in cls.__mro__:
        if klass is torch.autograd.Function or klass.__module__.startswith("torch."):
            return False
        if "setup_context" in klass.__dict__:
            return True
    return False


def record_values(gm: fx.GraphModule, example_inputs: tuple) -> None:
    """Store every node's value on ``example_inputs`` in ``node.meta["value"]`` (no gradients)."""

    class Recorder(fx.Interpreter):
        def run_node(self, node):
            result = super().run_node(node)
            node.meta["value"] = result
            return result

    with torch.no_grad():
        Recorder(gm).run(*example_inputs)


def trace_model(model: torch.nn.Module, example_inputs: tuple,
                leaf_module_paths: frozenset = frozenset()) -> tuple[fx.GraphModule, frozenset, list]:
    """Trace ``model`` on ``example_inputs``; modules with data-dependent control flow stay leaves.

    Returns the GraphModule (sharing ``model``'s parameters), the module paths kept as leaves, and
    the ``DataDependentControlFlow`` records that made them leaves. The model's state (buffers,
    attributes the forward assigns) is restored afterwards: tracing runs the forward for real.
    """
    leaves = frozenset(leaf_module_paths)
    records = []
    while True:
        saved_state = _snapshot(model)
        tracer = ConcreteTracer(leaves)
        try:
            # Tracing runs the forward for real: the global RNG must not advance (dropout).
            with torch.random.fork_rng(devices=[]):
                graph = tracer.trace_with_values(model, tuple(example_inputs))
        except DataDependentControlFlow as record:
            _restore(model, saved_state)
            _drop_tensor_constants(model, tracer)
            records.append(record)
            if record.module_path == "" or record.module_path in leaves:
                raise
            leaves = leaves | {record.module_path}
            continue
        _restore(model, saved_state)
        gm = fx.GraphModule(model, graph, class_name=type(model).__name__ + "Optimized")
        # Unpickling re-traces the generated code; that needs fx's plain tracer, not this one.
        gm._tracer_cls, gm._tracer_extras = None, {}
        _drop_tensor_constants(model, tracer)
        _constants_out_of_state_dict(gm)
        with torch.random.fork_rng(devices=[]):
            record_values(gm, tuple(example_inputs))
        _restore(model, saved_state)  # gm shares the model's modules: BatchNorm stats moved again
        return gm, leaves, records


def _snapshot(model: torch.nn.Module):
    modules = {}
    for module in model.modules():
        attrs = {k: v for k, v in vars(module).items()
                 if not k.startswith("_") and not isinstance(v, (torch.nn.Module,))}
        modules[id(module)] = (module, copy.copy(attrs), {k: (b.detach().clone() if b is not None else None)
                                                         for k, b in module._buffers.items()})
    return modules


def _restore(model: torch.nn.Module, saved) -> None:
    for module, attrs, buffers in saved.values():
        for key in [k for k in vars(module) if not k.startswith("_") and k not in attrs
                    and not isinstance(vars(module)[k], torch.nn.Module)]:
            delattr(module, key)
        for key, value in attrs.items():
            object.__setattr__(module, key, value)
        with torch.no_grad():
            for key, value in buffers.items():
                current = module._buffers.get(key)
                if isinstance(current, fx.Proxy):  # the forward assigned a traced value to the buffer
                    module._buffers[key] = value
                elif value is not None and current is not None and current.shape == value.shape:
                    current.copy_(value)
                else:
                    module._buffers[key] = value


def _constants_out_of_state_dict(gm: fx.GraphModule) -> None:
    # Constants (traced state initialisations) follow .to(device) but are not the user's state.
    for name, value in list(gm._buffers.items()):
        if name.startswith("_tensor_constant"):
            del gm._buffers[name]
            gm.register_buffer(name, value, persistent=False)


def _drop_tensor_constants(model: torch.nn.Module, tracer: fx.Tracer) -> None:
    # fx stores constant tensors met while tracing as attributes of the traced root; the
    # GraphModule has its own copies, the user's model must not keep them.
    for name in list(getattr(tracer, "tensor_attrs", {}).values()):
        if name.startswith("_tensor_constant") and hasattr(model, name):
            delattr(model, name)


def source_of(node: fx.Node) -> Optional[str]:
    """``file:line`` of the user code that created ``node`` (from fx's recorded stack trace)."""
    trace = node.meta.get("stack_trace")
    if not trace:
        return None
    lines = [line.strip() for line in trace.strip().splitlines()]
    for line in reversed(lines):
        if not line.startswith("File "):
            continue
        try:
            file_part, line_part = line.split(", line ")
        except ValueError:
            continue
        path = file_part[6:-1]
        normalised = path.replace("\\", "/")
        if "/torch/" in normalised or "/snnopt/" in normalised:
            continue
        return f"{short_path(path)}:{line_part.split(',')[0]}"
    return None
