"""``snnopt compile``, ``snnopt inspect`` and ``snnopt bench`` (registered on the app by :func:`register`).

Example::

    $ snnopt compile examples/seed_network_model.py --out build/seed_opt --onnx seed.onnx --graph seed.svg
    $ snnopt inspect build/seed_opt
    $ snnopt bench examples/seed_network_model.py --batch 32 --steps 50 --json
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import typer

from cli.model_file import LoadedModel, ModelFileError, load_model_file, run_model

BACKWARD_CHOICES = ("sparse", "exact")         # snnopt.spec.BACKWARD_MODES (a test keeps them equal)
ONNX_MODES = ("function", "scan", "unrolled")  # snnopt.export.MODES
GRAPH_SUFFIXES = {".svg": "svg", ".dot": "dot", ".gv": "dot", ".html": "html", ".htm": "html"}


class OutputError(Exception):
    """An output path that cannot be written; the message names it."""


# ------------------------------------------------------------------------------------ plumbing


def _fail(message: str, code: int = 2):
    typer.echo(f"snnopt: error: {message.splitlines()[0] if message else 'failed'}", err=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _user_errors(debug: bool):
    """One line and exit 2 for the user's errors, exit 1 for ours; the traceback with --debug."""
    try:
        yield
    except (typer.Exit, typer.Abort, KeyboardInterrupt):
        raise
    except Exception as error:  # noqa: BLE001 - every failure must become one readable line
        if debug:
            raise
        from snnopt.errors import SnnoptError

        if isinstance(error, (ModelFileError, OutputError, SnnoptError)):
            _fail(str(error))
        _fail(f"unexpected {type(error).__name__}: {error} (a bug in snnopt? run again with --debug and report the "
              "traceback)", code=1)


@contextlib.contextmanager
def _quiet(debug: bool):
    """Hide what torch.fx prints to stderr while the compiler probes rewrites (kept with --debug)."""
    if debug:
        yield
        return
    with contextlib.redirect_stderr(io.StringIO()):
        yield


def check_output_file(path: Optional[Path], what: str) -> Optional[Path]:
    """Refuse early (before minutes of work) a file path that cannot be written."""
    if path is None:
        return None
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{what} {path}: is a folder; give a file name")
    probe = path.parent if str(path.parent) else Path(".")
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK):
        raise OutputError(f"{what} {path}: cannot write there (no permission on {probe}); choose another path")
    return path


def write_output(path: Path, content) -> None:
    """Write ``content`` (str or bytes) to ``path`` through a temporary file moved into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def _console():
    from rich.console import Console

    # Wide enough for the layer table when stdout is a pipe (tests, CI logs).
    return Console(width=None if sys.stdout.isatty() else 160, highlight=False, soft_wrap=False)


def _check_choice(value: str, choices: tuple, option: str) -> str:
    if value not in choices:
        _fail(f"{option}: expected one of {', '.join(choices)}, got {value!r}")
    return value


def _optimize(loaded: LoadedModel, backward: str, window: float, backend: str, debug: bool):
    import snnopt

    try:
        with _quiet(debug):
            return snnopt.optimize(loaded.model, loaded.inputs, backward=backward, window=window, backend=backend)
    except snnopt.ModelTraceError:
        # Not run beforehand: a forward pass changes state (batch-norm statistics, snnTorch's hidden
        # state) that the optimized module would then start from. When tracing fails, a plain run
        # tells the user's own error (with its line) apart from ours.
        run_model(loaded)
        raise


def print_report(report, console) -> None:
    """The report as rich tables: fused layers, then regions left as written with reasons."""
    from rich.table import Table

    from snnopt.report import _short

    if report.layers:
        table = Table(title="Fused layers", title_justify="left")
        for column in ("#", "kind", "neurons", "steps", "β", "θ", "reset", "surrogate", "backward", "source"):
            table.add_column(column)
        for l in report.layers:
            table.add_row(str(l.index), l.kind + (" recurrent" if l.recurrent else ""), str(l.neurons), str(l.steps),
                          l.beta, l.threshold or "-", l.reset or "-", l.surrogate or "-",
                          l.backward + (f" (window {l.window:g})" if l.window is not None else ""), _short(l.source))
        console.print(table)
    else:
        console.print("Fused layers: none")
    if report.skipped:
        table = Table(title="Left as written", title_justify="left")
        for column in ("region", "reason", "source"):
            table.add_column(column, overflow="fold")
        for s in report.skipped:
            table.add_row(s.region, s.reason, _short(s.source) if s.source else "-")
        console.print(table)
    shapes = ("any batch size and number of steps" if report.any_shape else
              "fixed to " + ", ".join(str(tuple(s)) for s in report.traced_shapes))
    console.print(f"{len(report.layers)} layer(s) fused, {len(report.skipped)} region(s) left as written; "
                  f"backward={report.backward}" + (f" (window {report.window:g})" if report.backward == "sparse" else "")
                  + f"; input shapes: {shapes}; optimized in {report.seconds:.2f} s")


def _layer_spec(node):
    """The LifSpec a fused_layer node runs (what the Triton backend generates kernels for)."""
    from snnopt.functional.spiking import _make_spec

    kw = node.kwargs
    if not kw.get("spiking", True):
        return _make_spec("none", True, None, kw.get("surrogate", "superspike"), "exact", kw.get("window", 0.2),
                          False, recurrent=False)
    return _make_spec(kw.get("reset", "subtract"), kw.get("detach_reset", True), kw.get("alpha"),
                      kw.get("surrogate", "superspike"), kw.get("backward", "sparse"), kw.get("window", 0.2),
                      kw.get("fire_at_threshold", False),
                      recurrent=len(node.args) > 3 and node.args[3] is not None)


def emit_layer_kernels(optimized, directory: Path) -> list:
    try:
        import torch

        from snnopt.codegen.triton_lif import emit_kernels
    except ImportError as error:
        raise OutputError(f"--emit-kernels needs triton ({error}); pip install 'snnopt[gpu]'") from error
    from snnopt.functional.fused import fused_layer

    written = []
    for node in optimized.graph.nodes:
        if node.target is fused_layer:
            written += [str(p) for p in emit_kernels(_layer_spec(node), directory, dtype=torch.float32)]
    return sorted(set(written))


# ------------------------------------------------------------------------------------ commands

_MODEL_HELP = "Python file defining build_model() and example_inputs() (or `model` and `example_inputs`)."


def compile_command(
    file: Path = typer.Argument(..., help=_MODEL_HELP, show_default=False),
    out: Optional[Path] = typer.Option(None, "--out", help="Write an importable package here; its load() returns "
                                       "the optimized module with its weights."),
    backward: str = typer.Option("sparse", "--backward", help="Backward of the fused layers: sparse or exact."),
    window: float = typer.Option(0.2, "--window", help="Sparse backward: the surrogate counts where |v-θ| < window."),
    backend: str = typer.Option("auto", "--backend", help="auto, cpu or triton."),
    onnx: Optional[Path] = typer.Option(None, "--onnx", help="Export the inference forward to this ONNX file."),
    onnx_mode: str = typer.Option("function", "--onnx-mode", help="function (snnopt-domain nodes with Scan "
                                  "functions), scan (inline Scan) or unrolled (fixed number of steps)."),
    graph: Optional[Path] = typer.Option(None, "--graph", help="Draw the rewritten graph: .svg, .dot or .html."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON on stdout."),
    strict: bool = typer.Option(False, "--strict", help="Exit 1 when a region was left as written."),
    emit_kernels_dir: Optional[Path] = typer.Option(None, "--emit-kernels", help="Save the Triton kernel sources "
                                                    "of every fused layer in this folder."),
    model_name: Optional[str] = typer.Option(None, "--model", help="Name of the model (or function) in FILE."),
    inputs_name: Optional[str] = typer.Option(None, "--inputs", help="Name of the example inputs (or function)."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks and the compiler's own output."),
) -> None:
    """Optimize a model file: fuse its LIF loops, print what was fused and what was left alone (and why).

    Exit 0 on success, also when nothing could be fused; 1 with --strict when a region was left as
    written; 2 on bad input.
    """
    with _user_errors(debug):
        # Literal choices: a bad option or a missing file is answered before torch is imported.
        _check_choice(backward, BACKWARD_CHOICES, "--backward")
        _check_choice(backend, ("auto", "cpu", "triton"), "--backend")
        _check_choice(onnx_mode, ONNX_MODES, "--onnx-mode")
        if graph is not None and graph.suffix.lower() not in GRAPH_SUFFIXES:
            raise OutputError(f"--graph {graph}: use a .svg, .dot or .html file name")
        check_output_file(graph, "--graph")
        check_output_file(onnx, "--onnx")
        if out is not None:
            from snnopt.emit import check_writable_folder

            check_writable_folder(out)
        if emit_kernels_dir is not None and emit_kernels_dir.exists() and not emit_kernels_dir.is_dir():
            raise OutputError(f"--emit-kernels {emit_kernels_dir}: is a file; give a folder")
        loaded = load_model_file(file, model_name, inputs_name)
        optimized = _optimize(loaded, backward, window, backend, debug)
        import snnopt

        report = snnopt.explain(optimized)
        console = _console()
        written: dict = {}
        if not as_json:
            print_report(report, console)
        view = None
        if graph is not None or out is not None:
            from cli.graph_view import build_view, render

            view = build_view(loaded.model, loaded.inputs, optimized, title=file.name)
        if graph is not None:
            write_output(graph, render(view, GRAPH_SUFFIXES[graph.suffix.lower()], panels=("after",)))
            written["graph"] = str(graph)
        if out is not None:
            from cli.graph_view import render_json
            from snnopt.emit import emit_package

            emit_package(optimized, out, example_inputs=loaded.inputs, source=file.name,
                         extra_files={"inspect.json": render_json(view)})
            written["package"] = str(out)
        if onnx is not None:
            from snnopt.export import export_onnx

            with _quiet(debug):
                export_onnx(optimized, loaded.inputs, onnx, mode=onnx_mode)
            written["onnx"] = str(onnx)
        if emit_kernels_dir is not None:
            written["kernels"] = emit_layer_kernels(optimized, emit_kernels_dir)
        if as_json:
            typer.echo(json.dumps({"file": str(file), "model": loaded.name, "report": report.to_dict(),
                                   "written": written}, indent=2, default=list))
        else:
            for what, where in written.items():
                shown = where if isinstance(where, str) else f"{len(where)} file(s) in {emit_kernels_dir}"
                console.print(f"wrote {what}: {shown}")
        if strict and report.skipped:
            typer.echo(f"snnopt: --strict: {len(report.skipped)} region(s) left as written; first: "
                       f"{report.skipped[0].region}: {report.skipped[0].reason}", err=True)
            raise typer.Exit(1)


def inspect_command(
    target: Path = typer.Argument(..., help="A model file, or a package folder written by `snnopt compile --out`.",
                                  show_default=False),
    fmt: str = typer.Option("text", "--format", help="text, json, svg, dot or html."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Write here instead of stdout."),
    backward: str = typer.Option("sparse", "--backward", help="Backward of the fused layers: sparse or exact."),
    window: float = typer.Option(0.2, "--window", help="Sparse backward window."),
    model_name: Optional[str] = typer.Option(None, "--model", help="Name of the model (or function) in the file."),
    inputs_name: Optional[str] = typer.Option(None, "--inputs", help="Name of the example inputs (or function)."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks."),
) -> None:
    """Show the graph before and after, and which traced nodes became which fused op (β, θ, reset, surrogate, window)."""
    with _user_errors(debug):
        from cli.graph_view import FORMATS, build_view, render

        _check_choice(fmt, FORMATS, "--format")
        check_output_file(output, "--output")
        if target.is_dir():
            saved = target / "inspect.json"
            if not saved.exists():
                raise OutputError(f"{target}: not a package written by `snnopt compile --out` (no inspect.json)")
            view = json.loads(saved.read_text(encoding="utf-8"))
        else:
            loaded = load_model_file(target, model_name, inputs_name)
            optimized = _optimize(loaded, backward, window, "auto", debug)
            view = build_view(loaded.model, loaded.inputs, optimized, title=target.name)
        text = render(view, fmt)
        if output is None:
            typer.echo(text, nl=False)
        else:
            write_output(output, text)
            typer.echo(f"wrote {output}", err=True)


def bench_command(
    file: Path = typer.Argument(..., help=_MODEL_HELP, show_default=False),
    batch: Optional[int] = typer.Option(None, "--batch", min=1, help="Batch size (example_inputs(batch=...))."),
    steps: Optional[int] = typer.Option(None, "--steps", min=1, help="Time steps (example_inputs(steps=...))."),
    backward: str = typer.Option("sparse", "--backward", help="Backward of the fused layers: sparse or exact."),
    window: float = typer.Option(0.2, "--window", help="Sparse backward window."),
    repeat: int = typer.Option(5, "--repeat", min=1, help="Timed rounds; medians are reported."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as JSON on stdout."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Save a bar chart (PNG; needs matplotlib)."),
    model_name: Optional[str] = typer.Option(None, "--model", help="Name of the model (or function) in FILE."),
    inputs_name: Optional[str] = typer.Option(None, "--inputs", help="Name of the example inputs (or function)."),
    device: str = typer.Option("cpu", "--device", help="Where to run: cpu, cuda or cuda:N (the model and inputs "
                                                        "are moved there; CUDA runs the Triton kernels)."),
    cuda_graphs: bool = typer.Option(False, "--cuda-graphs", help="Also time the optimized model captured as CUDA "
                                                                  "graphs (snnopt.capture_graphs; needs --device "
                                                                  "cuda)."),
    debug: bool = typer.Option(False, "--debug", help="Show Python tracebacks."),
) -> None:
    """Time the original and the optimized model side by side: forward, backward, training step, memory."""
    with _user_errors(debug):
        from cli.bench import plot_results, run_bench

        _check_choice(backward, BACKWARD_CHOICES, "--backward")
        check_output_file(plot, "--plot")
        target = _bench_device(device, cuda_graphs)
        loaded = load_model_file(file, model_name, inputs_name, batch=batch, steps=steps)
        if target.type != "cpu":
            loaded = _moved(loaded, target)
        started = time.perf_counter()
        optimized = _optimize(loaded, backward, window, "auto", debug)
        compile_seconds = time.perf_counter() - started
        graphed = None
        if cuda_graphs:
            import snnopt

            graphed = snnopt.capture_graphs(optimized, loaded.inputs)
        console = _console() if not as_json else None
        results = run_bench(loaded, optimized, repeat, progress=not as_json, graphed=graphed)
        results.update(file=str(file), backward=backward, window=window, optimize_seconds=compile_seconds)
        if graphed is not None:
            results["cuda_graphs"] = {"fallbacks": graphed.fallbacks, "recaptures": graphed.recaptures,
                                      "plan": graphed.plan.summary()}
        if plot is not None:
            write_output(plot, plot_results(results))
        if as_json:
            typer.echo(json.dumps(results, indent=2))
        else:
            from cli.bench import print_results

            print_results(results, console)
            if plot is not None:
                console.print(f"wrote plot: {plot}")


def _bench_device(device: str, cuda_graphs: bool):
    """``--device`` as a torch.device, refused early (before the model loads) where it cannot run."""
    import torch

    try:
        target = torch.device(device)
    except (RuntimeError, ValueError):
        raise OutputError(f"--device {device}: not a device; use cpu, cuda or cuda:N") from None
    if target.type not in ("cpu", "cuda"):
        raise OutputError(f"--device {device}: snnopt bench runs on cpu or cuda")
    if target.type == "cuda" and not torch.cuda.is_available():
        raise OutputError(f"--device {device}: this machine has no CUDA GPU (torch.cuda.is_available() is False); "
                          "use --device cpu")
    if target.type == "cuda" and target.index is not None and target.index >= torch.cuda.device_count():
        raise OutputError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")
    if cuda_graphs and target.type != "cuda":
        raise OutputError("--cuda-graphs: CUDA graphs need a GPU; add --device cuda")
    return target


def _moved(loaded: LoadedModel, device) -> LoadedModel:
    import dataclasses

    return dataclasses.replace(loaded, model=loaded.model.to(device),
                               inputs=tuple(x.to(device) for x in loaded.inputs))


_EXAMPLES = {
    "compile": "Example: snnopt compile examples/seed_network_model.py --out build/seed_opt --onnx seed.onnx "
               "--graph seed.svg",
    "inspect": "Example: snnopt inspect examples/seed_network_model.py --format svg -o graph.svg",
    "bench": "Example: snnopt bench examples/seed_network_model.py --batch 32 --steps 50 --repeat 5 --plot bench.png",
}


def register(app: typer.Typer) -> None:
    app.command("compile", epilog=_EXAMPLES["compile"])(compile_command)
    app.command("inspect", epilog=_EXAMPLES["inspect"])(inspect_command)
    app.command("bench", epilog=_EXAMPLES["bench"])(bench_command)
