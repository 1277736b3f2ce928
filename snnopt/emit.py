"""Write an optimized module as an importable Python package that needs only torch and snnopt.

``emit_package(optimized, "build/seed_opt")`` writes::

    build/seed_opt/__init__.py     load() -> the optimized module with its weights
    build/seed_opt/module.py       the generated nn.Module: submodules and the rewritten forward
    build/seed_opt/weights.pt      parameters, buffers and graph constants (torch.load weights_only)
    build/seed_opt/report.json     what snnopt.explain says; load() attaches it again

The forward is the optimized ``torch.fx.GraphModule``'s own generated code; its globals become
imports from torch and snnopt. Nothing refers to the user's model file: submodules are rebuilt
from ``torch.nn`` constructors (their ``repr``), containers as plain modules holding the
parameters, and a user's surrogate spike function left in an unfused region is replaced by
:func:`snnopt.surrogate.spike` with the surrogate the compiler recognised (it fitted the
function's backward to that family). What cannot be expressed that way (a user-defined
submodule, an unrecognised spike function, a model left whole) raises :class:`EmitError` saying
which part. The package is written to a temporary folder beside the target, imported there and
checked against the optimized module on the example inputs, then moved into place: a failed
emission leaves nothing behind.

``fx.GraphModule.to_folder`` does the same kind of job but pickles any module it cannot print,
which would make the package import the user's classes.

Example::

    >>> emit_package(snnopt.optimize(model, x), "seed_opt", example_inputs=(x,))
    >>> import seed_opt; opt = seed_opt.load()
"""

from __future__ import annotations

import copy
import keyword
import importlib.util
import json
import operator
import os
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from snnopt.errors import SnnoptError
from snnopt.surrogate import get as get_surrogate
from snnopt.surrogate import spike

MARKER = "snnopt_package.json"
_IMPORTABLE_ROOTS = ("torch", "snnopt", "math", "operator", "builtins")
_CONTAINERS = (torch.nn.Sequential, torch.nn.ModuleList, torch.nn.ModuleDict)


class EmitError(SnnoptError):
    """The optimized module cannot be written as a package that imports only torch and snnopt."""


# --------------------------------------------------------------------------- graph preparation


def _spike_function_class(node: fx.Node):
    return getattr(node.target, "autograd_function", None) if node.op == "call_function" else None


def portable_graph(gm: fx.GraphModule) -> fx.Graph:
    """A copy of ``gm.graph`` whose calls all resolve inside torch and snnopt.

    Recognised spike functions become ``snnopt.surrogate.spike(u - shift, surrogate, None, fire)``.
    """
    graph = fx.Graph()
    mapping: dict = {}
    output = graph.graph_copy(gm.graph, mapping, return_output_node=True)
    graph.output(output[0] if isinstance(output, tuple) else output)
    for node in list(graph.nodes):
        if getattr(node.target, "__name__", "") == "run_unchanged":
            raise EmitError("the model was left whole (explain() says why), so there is no optimized graph "
                            "to write; the package would have to import your model's own code")
        function_class = _spike_function_class(node)
        if function_class is None:
            continue
        info = node.meta.get("spike")
        if info is None:
            raise EmitError(f"the spike function {function_class.__qualname__} (node {node.name}) was not "
                            f"recognised ({node.meta.get('spike_refusal', 'not probed')}); the package would have to "
                            "import your model's code")
        with graph.inserting_before(node):
            u = node.args[0]
            if info.shift:
                u = graph.call_function(operator.sub, (u, float(info.shift)))
            surrogate = graph.call_function(get_surrogate, (f"{info.surrogate.name}:{info.surrogate.param!r}",))
            replacement = graph.call_function(spike, (u, surrogate, None, bool(info.fire_at_threshold)))
        replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        graph.erase_node(node)
    graph.lint()
    return graph


def _import_line(name: str, value) -> str:
    module = getattr(value, "__module__", None) or ""
    qualname = getattr(value, "__qualname__", None) or getattr(value, "__name__", "")
    if module.split(".")[0] not in _IMPORTABLE_ROOTS or "<" in qualname:
        raise EmitError(f"the graph calls {module}.{qualname}, which is neither torch nor snnopt; the package "
                        "would have to import your model's code")
    owner = sys.modules.get(module) or importlib.import_module(module)
    found = owner
    for part in qualname.split("."):
        found = getattr(found, part, None)
    if found is not value:
        raise EmitError(f"cannot import {module}.{qualname} by name (it is {value!r})")
    if module == "builtins":
        return f"{name} = {qualname}" if name != qualname else ""
    head, _, tail = qualname.partition(".")
    line = f"from {module} import {head}" + (f" as {name}" if not tail and name != head else "")
    return line + (f"\n{name} = {head}.{tail}" if tail else "")


_HEADER_GLOBALS = {"inf", "nan", "NoneType", "torch", "device", "fx_pytree", "pytree"}


def _globals_source(globals_: dict) -> list:
    lines = []
    for name, value in sorted(globals_.items()):
        if name in _HEADER_GLOBALS:
            continue
        line = _import_line(name, value)
        if line:
            lines.append(line)
    return lines


# --------------------------------------------------------------------------- module tree


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype)  # "torch.float32"


def _is_torch_leaf(module: torch.nn.Module) -> bool:
    cls = type(module)
    return (cls.__module__.startswith("torch.nn.") and cls is not torch.nn.Module and not isinstance(module, _CONTAINERS)
            and not list(module.children()))


def _access(path: str) -> str:
    """Python for ``self.<path>``: ``getattr`` where a name is not an identifier (``nn.Sequential``'s ``0``)."""
    expression = "self"
    for part in path.split(".") if path else []:
        expression = f"{expression}.{part}" if part.isidentifier() and not keyword.iskeyword(part) \
            else f"getattr({expression}, {part!r})"
    return expression


def _module_lines(gm: fx.GraphModule) -> tuple[list, list]:
    """``__init__`` lines that rebuild gm's submodules, parameters and buffers; and tie lines."""
    lines, ties, seen = [], [], {}
    built_by_constructor = set()
    for path, module in gm.named_modules(remove_duplicate=False):
        if not path:
            holder = "self"
        else:
            holder = _access(path)
            parent_path, _, leaf = path.rpartition(".")
            parent = _access(parent_path)
            if id(module) in seen:
                ties.append(f"{parent}.add_module({leaf!r}, {seen[id(module)]})")
                continue
            seen[id(module)] = holder
            if _is_torch_leaf(module):
                lines.append(f"{parent}.add_module({leaf!r}, torch.nn.{repr(module)})")
                built_by_constructor.add(path)
            elif type(module) in (torch.nn.Module, *_CONTAINERS) or isinstance(module, fx.GraphModule):
                container = type(module).__name__ if type(module) in _CONTAINERS else "Module"
                lines.append(f"{parent}.add_module({leaf!r}, torch.nn.{container}())")
            else:
                cls = type(module)
                raise EmitError(f"submodule {path!r} is a {cls.__module__}.{cls.__qualname__}, not a torch.nn module; "
                                "the package would have to import your model's code")
        if path in built_by_constructor:
            continue
        for name, param in module._parameters.items():
            if param is None:
                continue
            if id(param) in seen:
                ties.append(f"{holder}.register_parameter({name!r}, {seen[id(param)]})")
                continue
            seen[id(param)] = _access(f"{path}.{name}" if path else name)
            lines.append(f"{holder}.register_parameter({name!r}, torch.nn.Parameter(torch.empty("
                         f"{tuple(param.shape)}, dtype={_dtype(param)}), requires_grad={param.requires_grad}))")
        for name, buffer in module._buffers.items():
            if buffer is None:
                continue
            persistent = name not in module._non_persistent_buffers_set
            lines.append(f"{holder}.register_buffer({name!r}, torch.empty({tuple(buffer.shape)}, "
                         f"dtype={_dtype(buffer)}), persistent={persistent})")
    return lines, ties


def _graph_constants(gm: fx.GraphModule, graph: fx.Graph) -> dict:
    """Tensors the graph reads with get_attr that are neither parameters nor buffers."""
    registered = {n for n, _ in gm.named_parameters(remove_duplicate=False)}
    registered |= {n for n, _ in gm.named_buffers(remove_duplicate=False)}
    constants = {}
    for node in graph.nodes:
        if node.op == "get_attr" and node.target not in registered:
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            if isinstance(value, torch.Tensor):
                constants[node.target] = value.detach()
    return constants


def _non_persistent_buffers(gm: fx.GraphModule) -> dict:
    found = {}
    for path, module in gm.named_modules():
        for name in module._non_persistent_buffers_set:
            if module._buffers.get(name) is not None:
                found[f"{path}.{name}" if path else name] = module._buffers[name].detach()
    return found


# --------------------------------------------------------------------------- package text

_INIT = '''"""{title}

Written by ``snnopt compile --out``; needs only torch and snnopt. Example::

    import {package}
    module = {package}.load()            # the optimized module, its weights loaded
    print(snnopt.explain(module))        # what was fused
"""

from .module import OptimizedModule, load

__all__ = ["OptimizedModule", "load"]
'''

_MODULE = '''"""The optimized module: generated by snnopt {version} from {source}. Do not edit by hand."""

import json
import math
import operator
from pathlib import Path

import torch
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch import device

import snnopt
from snnopt.report import FusedLayer, Report, SkippedRegion
{imports}

inf = math.inf
nan = math.nan
NoneType = type(None)
_HERE = Path(__file__).resolve().parent
TRAINING = {training}


class OptimizedModule(torch.nn.Module):
    """{class_doc}"""

    def __init__(self):
        super().__init__()
{init}

    def _tie_shared(self):
        # Tensors shared between several names in the original; loading assigns each name its own copy.
{ties}
{forward}

def load(map_location="cpu"):
    """The optimized module with its weights (from weights.pt beside this file) and its snnopt report."""
    module = OptimizedModule()
    saved = torch.load(_HERE / "weights.pt", map_location=map_location, weights_only=True)
    module.load_state_dict(saved["state_dict"], strict=True, assign=True)
    for name, tensor in list(saved["non_persistent"].items()) + list(saved["constants"].items()):
        owner, _, leaf = name.rpartition(".")
        target = module.get_submodule(owner) if owner else module
        if leaf in target._buffers:
            target._buffers[leaf] = tensor
        else:
            setattr(target, leaf, tensor)
    module._tie_shared()
    module.train(TRAINING)
    report = json.loads((_HERE / "report.json").read_text())
    module.snnopt_report = Report(**{{**report, "layers": [FusedLayer(**l) for l in report["layers"]],
                                     "skipped": [SkippedRegion(**s) for s in report["skipped"]],
                                     "traced_shapes": [tuple(s) for s in report["traced_shapes"]]}})
    return module
'''


def _indent(lines, spaces: int) -> str:
    return "\n".join(" " * spaces + line if line else "" for text in lines for line in text.splitlines()) or \
        " " * spaces + "pass"


def render_package(gm: fx.GraphModule, package: str, source: str = "a model") -> dict:
    """The package's files as ``{name: str | bytes-writer}`` (see :func:`emit_package`)."""
    from snnopt import __version__

    graph = portable_graph(gm)
    code = graph.python_code(root_module="self")
    imports = _globals_source(code.globals)
    init, ties = _module_lines(gm)
    report = getattr(gm, "snnopt_report", None)
    report_dict = report.to_dict() if report is not None else {"layers": [], "skipped": []}
    class_doc = (f"{len(report_dict['layers'])} fused layer(s), {len(report_dict['skipped'])} region(s) left as "
                 "written; see report.json")
    module_text = _MODULE.format(version=__version__, source=source.replace('"', "'"), imports="\n".join(imports),
                                 training=bool(gm.training), class_doc=class_doc, init=_indent(init, 8),
                                 ties=_indent(ties, 8), forward=_indent([code.src.strip("\n")], 4))
    weights = {"state_dict": {k: v.detach() for k, v in gm.state_dict().items()},
               "non_persistent": _non_persistent_buffers(gm), "constants": _graph_constants(gm, graph)}
    return {
        "__init__.py": _INIT.format(title=f"{package}: an snnopt-optimized module ({source}).", package=package),
        "module.py": module_text,
        "weights.pt": weights,
        "report.json": json.dumps(report_dict, indent=2, default=list) + "\n",
        MARKER: json.dumps({"snnopt": __version__, "source": source}) + "\n",
    }


def import_package(directory, name: str | None = None):
    """Import the package in ``directory`` under a fresh module name (the emitted package or a check)."""
    directory = Path(directory)
    name = name or f"snnopt_emitted_{uuid.uuid4().hex}"
    spec = importlib.util.spec_from_file_location(name, directory / "__init__.py",
                                                  submodule_search_locations=[str(directory)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _outputs(module, inputs) -> list:
    """Outputs of one seeded run; the module's state (batch-norm statistics …) is put back after."""
    saved = copy.deepcopy(module.state_dict())
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            leaves, _ = tree_flatten(module(*inputs))
    finally:
        module.load_state_dict(saved)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


def check_package(directory, optimized: torch.nn.Module, example_inputs) -> None:
    """Import the package and compare its outputs with ``optimized`` on ``example_inputs``."""
    inputs = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    try:
        loaded = import_package(directory).load()
        got = _outputs(loaded, inputs)
    except Exception as error:
        raise EmitError(f"the written package failed to load or run ({type(error).__name__}: {error})") from error
    expected = _outputs(optimized, inputs)
    if len(got) != len(expected) or not all(g.shape == e.shape and torch.equal(g, e) for g, e in zip(got, expected)):
        raise EmitError("the written package does not reproduce the optimized module's outputs")


def check_writable_folder(directory) -> Path:
    """Refuse (EmitError) a target we must not overwrite or cannot create."""
    directory = Path(directory)
    if not directory.name.isidentifier():
        raise EmitError(f"{directory}: {directory.name!r} is not a valid Python package name; use letters, digits "
                        "and underscores (e.g. seed_opt)")
    if directory.exists() and (not directory.is_dir() or (any(directory.iterdir())
                                                         and not (directory / MARKER).exists())):
        raise EmitError(f"{directory}: exists and is not an snnopt package; choose a new folder")
    parent = directory.parent if str(directory.parent) else Path(".")
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise EmitError(f"{directory}: cannot write there (no permission on {probe}); choose another folder")
    return directory


def emit_package(optimized: fx.GraphModule, directory, *, example_inputs=None, source: str = "a model",
                 extra_files: dict | None = None) -> Path:
    """Write ``optimized`` (from :func:`snnopt.optimize`) as a package at ``directory``; return its path.

    With ``example_inputs`` the written package is imported and must reproduce ``optimized``'s
    outputs before it replaces ``directory``. ``extra_files`` (``{name: text}``) are written beside
    the code (the CLI adds its ``inspect.json``). Raises :class:`EmitError` when the module needs code
    outside torch and snnopt.

    Example::

        >>> emit_package(opt, "build/seed_opt", example_inputs=(x,))
    """
    directory = check_writable_folder(directory)
    files = {**render_package(optimized, directory.name, source), **(extra_files or {})}
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        for name, content in files.items():
            if isinstance(content, str):
                (staging / name).write_text(content, encoding="utf-8")
            else:
                torch.save(content, staging / name)
        if example_inputs is not None:
            check_package(staging, optimized, example_inputs)
        shutil.rmtree(staging / "__pycache__", ignore_errors=True)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(staging, directory)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return directory


__all__ = ["emit_package", "render_package", "check_package", "import_package", "portable_graph", "EmitError"]
