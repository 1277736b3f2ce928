"""On-disk cache of generated kernel source, imported as real modules.

Triton's JIT reads a kernel's source with ``inspect``, so generated kernels must live in real files.
Each source is written atomically (a temporary file in the same folder, then ``os.replace``) to a
file named after its hash, and imported from there with ``importlib``; never ``exec``. The same
source gives the same file in every process, so a second process reuses both the file and
Triton's own compiled-binary cache.

The folder is ``$SNNOPT_CACHE_DIR`` if set, else ``~/.cache/snnopt/triton``; if that cannot be
written, a per-user folder in the system temporary directory.

Example::

    >>> module = load_module("lif_kernels", "X = 1\\n")
    >>> module.X
    1
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sys
import tempfile
import threading
from pathlib import Path
from types import ModuleType

_LOCK = threading.Lock()
_LOADED: dict[tuple[str, str], ModuleType] = {}


def cache_dir() -> Path:
    """The folder generated kernel files go to (created if needed)."""
    configured = os.environ.get("SNNOPT_CACHE_DIR")
    candidates = [Path(configured)] if configured else [Path.home() / ".cache" / "snnopt" / "triton"]
    candidates.append(Path(tempfile.gettempdir()) / f"snnopt-triton-{os.getuid() if hasattr(os, 'getuid') else 0}")
    for folder in candidates:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK | os.X_OK):
            return folder
    raise OSError(f"snnopt: no writable folder for generated kernels (tried {[str(c) for c in candidates]}); "
                  f"set SNNOPT_CACHE_DIR to a writable folder")


def source_name(prefix: str, source: str) -> str:
    """``prefix_<hash>``: the module (and file) name of a generated source."""
    return f"{prefix}_{hashlib.sha256(source.encode()).hexdigest()[:20]}"


def write_atomically(path: Path, text: str) -> Path:
    """Write ``text`` to ``path`` so that readers see either nothing or the whole file."""
    path = Path(path)
    if path.exists() and path.read_text() == text:
        return path
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_module(prefix: str, source: str) -> ModuleType:
    """Import ``source`` from its hash-named file in :func:`cache_dir`; memoised per process.

    The memo key includes ``TRITON_INTERPRET``: ``triton.jit`` decides at import time whether a
    kernel is compiled or interpreted.
    """
    name = source_name(prefix, source)
    key = (name, os.environ.get("TRITON_INTERPRET", ""))
    with _LOCK:
        module = _LOADED.get(key)
        if module is not None:
            return module
        path = write_atomically(cache_dir() / f"{name}.py", source)
        module_name = f"snnopt_generated.{name}" + ("_interpreted" if key[1] == "1" else "")
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # inspect.getsource finds kernels through sys.modules
        spec.loader.exec_module(module)
        _LOADED[key] = module
        return module
