"""Shared helpers for the benchmark scripts: machine description, side-by-side timing, bytes saved
for backward, JSON, a readable table and a bar chart.

Timings are medians over repeats that interleave the variants round-robin, so every ratio compares
numbers taken under the same machine conditions. Nothing here is a test: the scripts record facts,
CI only runs them in their ``--quick`` mode to check they still work.

Example::

    >>> info = machine_info()
    >>> sorted(info)[:2]
    ['cores', 'cpu']
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import re
import statistics
import subprocess
import time
import weakref
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    """What the numbers were measured on; goes into every result file."""
    return {
        "cpu": cpu_model(),
        "processor": platform.processor(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def cpu_idle_fraction(seconds: float = 1.0) -> float:
    """Share of all cores' time that was idle over the next ``seconds`` (Linux; NaN elsewhere).

    Recorded next to timings: other processes on a 2-core machine distort them badly.
    """
    def read():
        with open("/proc/stat") as stat:
            fields = [int(v) for v in stat.readline().split()[1:]]
        return fields[3] + fields[4], sum(fields)  # idle + iowait, total

    try:
        idle0, total0 = read()
        time.sleep(seconds)
        idle1, total1 = read()
    except OSError:
        return float("nan")
    return (idle1 - idle0) / max(total1 - total0, 1)


def load_info() -> dict:
    """System load now: 1-minute load average and the idle share of the CPUs over one second."""
    return {"load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
            "cpu_idle_fraction": round(cpu_idle_fraction(), 3)}


class ForeignLoad:
    """Share of the machine's CPU time used by *other* processes between two snapshots (Linux).

    Our own CPU time (all threads, from ``os.times``) is subtracted from the busy time in
    /proc/stat, so a timing round can be flagged as contended after the fact. Resolution is one
    clock tick (10 ms) per CPU; NaN where /proc/stat is missing.
    """

    _TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    @staticmethod
    def snapshot():
        try:
            with open("/proc/stat") as stat:
                fields = [int(v) for v in stat.readline().split()[1:9]]
        except OSError:
            return None
        own = os.times()
        return sum(fields) - fields[3] - fields[4], sum(fields), own.user + own.system

    @classmethod
    def share(cls, start, end) -> float:
        if start is None or end is None or end[1] <= start[1]:
            return float("nan")
        busy = (end[0] - start[0]) / cls._TICK
        own = end[2] - start[2]
        return max(0.0, busy - own) / ((end[1] - start[1]) / cls._TICK)


def wait_for_idle(timeout: float, idle: float = 0.9) -> dict:
    """Poll until the CPUs are ``idle`` (share) idle over a second, or ``timeout`` seconds passed."""
    start = time.monotonic()
    while True:
        info = load_info()
        info["waited_s"] = round(time.monotonic() - start, 1)
        if info["cpu_idle_fraction"] >= idle or info["waited_s"] >= timeout:
            return info
        time.sleep(4.0)


def median(values) -> float:
    return float(statistics.median(values))


class SavedBytes:
    """Bytes the autograd graph keeps for the backward pass, counted after a forward.

    Every tensor saved for backward passes through a ``saved_tensors_hooks`` pack hook, which
    keeps a weak reference to it; :meth:`summary` counts the tensors still alive, so what a node
    saved and then lost (a branch of the graph that was detached and freed) does not count. Storages
    are counted once (keyed by the untyped storage's data pointer): a tensor saved by several nodes,
    or several views of one buffer, count once, and a view counts its whole buffer (that is what
    stays alive). Parameters and the given input tensors are counted like any other saved tensor
    and also reported on their own (the caller holds them anyway; the rest is extra). Tensors that
    an ``autograd.Function`` keeps as ``ctx`` attributes instead of ``save_for_backward`` bypass
    the hook; :meth:`scan_graph` finds those by walking the graph.
    """

    def __init__(self, parameters=(), inputs=()):
        self._param_ptrs = {p.untyped_storage().data_ptr() for p in parameters}
        self._input_ptrs = {t.untyped_storage().data_ptr() for t in inputs}
        self._packed: list[weakref.ref] = []
        self._on_ctx: list[torch.Tensor] = []
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda tensor: tensor)

    def _pack(self, tensor):
        self._packed.append(weakref.ref(tensor))
        return tensor

    @staticmethod
    def _storage(tensor) -> tuple[int, int]:
        try:
            storage = tensor.untyped_storage()
            return storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):  # sparse / nested layouts have no single storage
            return id(tensor), tensor.nbytes

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)

    def scan_graph(self, output: torch.Tensor) -> None:
        """Find tensors held as attributes of Python autograd nodes reachable from ``output``."""
        stack, visited = [output.grad_fn], set()
        while stack:
            node = stack.pop()
            if node is None or id(node) in visited:
                continue
            visited.add(id(node))
            for value in getattr(node, "__dict__", {}).values():
                for tensor in value if isinstance(value, (tuple, list)) else (value,):
                    if isinstance(tensor, torch.Tensor):
                        self._on_ctx.append(tensor)
            stack.extend(next_node for next_node, _ in node.next_functions)

    def summary(self) -> dict:
        """Call while the graph is alive (before backward, with the output still referenced)."""
        saved = dict(self._storage(t) for t in (ref() for ref in self._packed) if t is not None)
        on_ctx = {ptr: n for ptr, n in map(self._storage, self._on_ctx) if ptr not in saved}
        everything = {**saved, **on_ctx}
        total = sum(everything.values())
        params = sum(n for ptr, n in everything.items() if ptr in self._param_ptrs)
        inputs = sum(n for ptr, n in everything.items() if ptr in self._input_ptrs)
        return {
            "total": total,
            "parameters": params,
            "inputs": inputs,
            "activations": total - params - inputs,
            "on_ctx_attributes": sum(on_ctx.values()),
            "storages": len(everything),
        }


class StepTimer:
    """Marks within one training step. On CPU ``perf_counter`` is enough (no async); while
    :func:`timing_device` names a CUDA device, the marks are CUDA events on the current stream
    (GPU kernels run asynchronously, so host clocks would time the launches), read after one
    synchronisation in :meth:`intervals`."""

    device: torch.device | None = None  # set by timing_device(); None or a CPU device: host clock

    def __init__(self):
        self._cuda = self.device is not None and self.device.type == "cuda"
        self.marks = []
        self.mark()

    def mark(self) -> None:
        if self._cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self._cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


@contextlib.contextmanager
def timing_device(device):
    """Make every :class:`StepTimer` created inside the block time work on ``device``.

    Example::

        >>> with timing_device("cpu"):
        ...     timer = StepTimer()
    """
    previous, StepTimer.device = StepTimer.device, torch.device(device)
    try:
        yield
    finally:
        StepTimer.device = previous


def idle_gaps(device_spans, host_spans, window, *, min_us: float = 5.0, top: int = 8) -> dict:
    """Where a device waited for its host within ``window``: the stretches no device span covers.

    ``device_spans`` and ``host_spans`` are ``(start_us, end_us, name)`` on one clock (a profiler
    trace's kernels and host operations); ``window`` is ``(start_us, end_us)`` of the traced call.
    Returns ``idle_us`` (all idle time) and the ``top`` longest ``gaps`` of at least ``min_us``, each
    with the device work before and after it and ``host``: the host operations that ran during it
    (those overlapping it without covering it whole: what kept the host busy or waiting), by overlap.
    An eager layer whose device time is far below its event time shows here where the host held it up.

    Example::

        >>> idle_gaps([(10, 20, "k1"), (50, 60, "k2")], [(22, 48, "aten::empty")], (0, 70))["idle_us"]
        50.0
    """
    merged: list[list] = []  # [start, end, first name, last name]
    for start, end, name in sorted(device_spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
            merged[-1][3] = name
        else:
            merged.append([start, end, name, name])
    begin, finish = window
    bounds = [(begin, "start of call")] + [(m[1], m[3]) for m in merged]
    nexts = [(m[0], m[2]) for m in merged] + [(finish, "end of call")]
    gaps = []
    for (gap_start, after), (gap_end, before) in zip(bounds, nexts):
        gap_start, gap_end = max(gap_start, begin), min(gap_end, finish)
        if gap_end - gap_start > 0:
            gaps.append((gap_end - gap_start, gap_start, gap_end, after, before))
    # The host operations of the longest gaps only: a dense loop's trace has thousands of each.
    longest = sorted((g for g in gaps if g[0] >= min_us), key=lambda g: -g[0])[:top]
    described = []
    for length, gap_start, gap_end, after, before in longest:
        overlap: dict = {}
        for start, end, name in host_spans:
            covered = min(end, gap_end) - max(start, gap_start)
            if covered > 0 and not (start <= gap_start and end >= gap_end):
                overlap[name] = overlap.get(name, 0.0) + covered
        busiest = sorted(overlap.items(), key=lambda kv: -kv[1])[:6]
        described.append({"idle_us": round(float(length), 1), "after": after, "before": before,
                          "host": {name: round(us, 1) for name, us in busiest}})
    return {"idle_us": round(float(sum(g[0] for g in gaps)), 1), "gaps": described}


def profiler_gaps(prof) -> dict:
    """:func:`idle_gaps` of a ``torch.profiler`` trace: its CUDA kernels and copies against its host
    operations, over the span of the host operations (no CUDA activity: every stretch is idle)."""
    device_spans, host_spans = [], []
    for event in prof.events():
        span = (float(event.time_range.start), float(event.time_range.end), event.name)
        (device_spans if str(getattr(event, "device_type", "")).endswith("CUDA") else host_spans).append(span)
    if not host_spans:
        return {"idle_us": 0.0, "gaps": []}
    window = (min(s[0] for s in host_spans), max(s[1] for s in host_spans))
    return idle_gaps(device_spans, host_spans, window)


def synchronize(device) -> None:
    """Wait for the device's queued work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def git_commit(default: str | None = None) -> str | None:
    """The repository's HEAD commit (``-dirty`` when tracked files changed), else ``$SNNOPT_COMMIT``
    or ``default``: result files must say which code they measured, also on copies without .git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("SNNOPT_COMMIT", default)


def source_digest(folder: str = "snnopt") -> str:
    """SHA-256 of the ``*.py`` files under ``folder`` (sorted paths and contents): names the code
    measured even where no git metadata travelled with it."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted((root / folder).rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def slug(text: str) -> str:
    """``"NVIDIA H100 80GB HBM3"`` -> ``"nvidia-h100-80gb-hbm3"`` (for file names)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def device_info(device) -> dict:
    """The accelerator (or CPU) the numbers were measured on, and the library versions that matter there."""
    device = torch.device(device)
    info = {"device": str(device), "torch": torch.__version__, "cuda_runtime": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_bytes=props.total_memory, multiprocessors=props.multi_processor_count,
                    cudnn=torch.backends.cudnn.version(), driver=_nvidia_driver(),
                    matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    else:
        info.update(name=cpu_model())
    return info


def _nvidia_driver() -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True).stdout.strip()
        return out.splitlines()[0] if out else None
    except (OSError, subprocess.SubprocessError):
        return None


def write_json(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def print_table(title: str, columns: list[str], rows: list[list[str]], notes: list[str] = ()) -> None:
    """A table on stdout: rich when it is installed, aligned plain text otherwise."""
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        widths = [max(len(str(c)) for c in col) for col in zip(columns, *rows)]
        print(title)
        for row in [columns, ["-" * w for w in widths], *rows]:
            print("  ".join(str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))))
        for note in notes:
            print(note)
        return
    table = Table(title=title)
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[str(c) for c in row])
    console = Console(width=max(120, Console().width))
    console.print(table)
    for note in notes:
        console.print(note)


def bar_chart(path: Path, title: str, variants: list[str], series: dict[str, list[float]], ylabel: str,
              side_panel: tuple[str, list[float]] | None = None) -> bool:
    """Grouped bars (one group per variant, one bar per series), log y axis; False if no matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    panels = 2 if side_panel else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 + 4 * (panels - 1), 4.5),
                             gridspec_kw={"width_ratios": [7, 4][:panels]}, squeeze=False)
    ax = axes[0][0]
    width = 0.8 / len(series)
    for k, (label, values) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(variants))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7, padding=1)
    ax.set_xticks(range(len(variants)), variants, rotation=25, ha="right", fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    if side_panel:
        label, values = side_panel
        ax2 = axes[0][1]
        bars = ax2.bar(range(len(variants)), values, 0.6, color="tab:gray")
        ax2.bar_label(bars, labels=[f"{v:.3g}" for v in values], fontsize=7, padding=1)
        ax2.set_xticks(range(len(variants)), variants, rotation=25, ha="right", fontsize=8)
        ax2.set_ylabel(label)
        ax2.set_title("saved for backward", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
