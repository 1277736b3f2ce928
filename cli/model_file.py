"""Load a user's *model file*: a Python file that defines the model and its example inputs.

The convention (README, "The command line"): the file defines ``build_model()`` and
``example_inputs()`` (a tensor or a tuple of tensors), or module-level ``model`` and
``example_inputs``; ``--model NAME`` / ``--inputs NAME`` pick other names. A name may hold the
object or a function returning it. The file runs as ``python model.py`` would run it: its folder
is first on ``sys.path``, so its own imports of neighbouring files work.

``example_inputs`` may take ``batch`` and ``steps`` keywords; ``snnopt bench --batch/--steps``
passes them.

Every problem is a :class:`ModelFileError` whose message is one line naming the file, what went
wrong and what to do; the command prints it and exits 2.

Example::

    >>> loaded = load_model_file("examples/seed_network_model.py")
    >>> loaded.model, loaded.inputs[0].shape
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path

MODEL_NAMES = ("build_model", "model")
INPUTS_NAMES = ("example_inputs",)


class ModelFileError(Exception):
    """A model file could not be loaded; the message is the one line the user sees."""


@dataclass
class LoadedModel:
    path: Path
    name: str            # the variable or function the model came from
    model: object        # a torch.nn.Module
    inputs: tuple        # tensors
    namespace: object    # the imported module, for re-calling example_inputs


def _where(error: BaseException, path: Path) -> str:
    """``file:line`` of the innermost frame of ``error`` inside the model file's folder."""
    frames = [f for f in inspect.getinnerframes(error.__traceback__, context=0)
              if Path(f.filename).resolve().parent == path.parent] if error.__traceback__ else []
    return f"{path.name}:{frames[-1].lineno}" if frames else path.name


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def import_model_file(path: Path):
    """Run the file as a module (its folder first on ``sys.path``) and return the module object."""
    if not path.exists():
        raise ModelFileError(f"{path}: no such file; give the path of a Python file that defines build_model() "
                             "and example_inputs()")
    if path.is_dir():
        raise ModelFileError(f"{path}: is a folder; give the path of a Python model file")
    try:
        source = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        raise ModelFileError(f"{path}: cannot be read ({_describe(error)})") from error
    try:
        compile(source, str(path), "exec")
    except SyntaxError as error:
        raise ModelFileError(f"{path}:{error.lineno}: syntax error: {error.msg}; fix the file and run again") from error
    folder = str(path.parent)
    if folder not in sys.path:
        sys.path.insert(0, folder)
    module_name = f"snnopt_user_model_{abs(hash(str(path)))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as error:
        del sys.modules[module_name]
        raise ModelFileError(f"{_where(error, path)}: importing the model file raised {_describe(error)}; "
                             "run `python FILE` to see the whole error, or add --debug") from error
    return module


def _call_or_value(namespace, name: str, path: Path, what: str, **kwargs):
    value = getattr(namespace, name)
    if callable(value) and not _is_module(value):
        accepted = {k: v for k, v in kwargs.items() if v is not None and _accepts(value, k)}
        missing = [k for k, v in kwargs.items() if v is not None and k not in accepted]
        if missing:
            raise ModelFileError(f"{path}: {name}() takes no {'/'.join(missing)} argument, needed by "
                                 f"--{'/--'.join(missing)}; add `{missing[0]}=None` to its parameters")
        try:
            return value(**accepted)
        except Exception as error:
            raise ModelFileError(f"{_where(error, path)}: {name}() raised {_describe(error)} while building the "
                                 f"{what}; add --debug for the traceback") from error
    if any(v is not None for v in kwargs.values()):
        raise ModelFileError(f"{path}: {name} is a value, not a function, so --batch/--steps cannot resize it; "
                             f"define {name}(batch=None, steps=None)")
    return value


def _accepts(function, keyword: str) -> bool:
    try:
        parameters = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return keyword in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def _is_module(value) -> bool:
    import torch

    return isinstance(value, torch.nn.Module)


def load_model_file(path, model_name: str | None = None, inputs_name: str | None = None,
                    batch: int | None = None, steps: int | None = None) -> LoadedModel:
    """Import ``path`` and return its model and example inputs (see the module docstring)."""
    import torch

    path = Path(path).expanduser().resolve() if Path(path).expanduser().exists() else Path(path)
    namespace = import_model_file(path)
    model_names = (model_name,) if model_name else MODEL_NAMES
    found = next((n for n in model_names if hasattr(namespace, n)), None)
    if found is None:
        looked = " or ".join(f"`{n}`" for n in model_names)
        raise ModelFileError(f"{path}: no model found: looked for {looked}; define build_model() returning a "
                             "torch.nn.Module, or pass --model NAME")
    model = _call_or_value(namespace, found, path, "model")
    if not isinstance(model, torch.nn.Module):
        raise ModelFileError(f"{path}: `{found}` gave a {type(model).__name__}, not a torch.nn.Module")
    inputs_names = (inputs_name,) if inputs_name else INPUTS_NAMES
    found_inputs = next((n for n in inputs_names if hasattr(namespace, n)), None)
    if found_inputs is None:
        looked = " or ".join(f"`{n}`" for n in inputs_names)
        raise ModelFileError(f"{path}: no example inputs found: looked for {looked}; define example_inputs() "
                             "returning a tensor or a tuple of tensors, or pass --inputs NAME")
    inputs = _call_or_value(namespace, found_inputs, path, "example inputs", batch=batch, steps=steps)
    if isinstance(inputs, list):
        inputs = tuple(inputs)
    if isinstance(inputs, torch.Tensor):
        inputs = (inputs,)
    if not (isinstance(inputs, tuple) and inputs and all(isinstance(x, torch.Tensor) for x in inputs)):
        raise ModelFileError(f"{path}: `{found_inputs}` gave a {type(inputs).__name__}; expected a tensor or a "
                             "tuple of tensors")
    return LoadedModel(path=path, name=found, model=model, inputs=inputs, namespace=namespace)


def run_model(loaded: LoadedModel):
    """Run the model once on its inputs; a failure is the user's, reported in one line."""
    import torch

    try:
        with torch.no_grad():
            return loaded.model(*loaded.inputs)
    except Exception as error:
        raise ModelFileError(f"{_where(error, loaded.path)}: the model raised {_describe(error)} on its example "
                             "inputs; add --debug for the traceback") from error
