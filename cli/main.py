"""The ``snnopt`` command: compile, inspect and bench a model file; info.

Importing this module loads only typer: ``snnopt --version`` and ``snnopt --help`` answer at once,
and torch, numba and triton are imported by the commands that use them.

Every error the user can cause (a missing or broken model file, a model that raises, an output
path that cannot be written) is one line on stderr and exit code 2; ``--debug`` shows the
traceback instead. Outputs are written to a temporary file beside the target and moved into
place, so a failed run leaves nothing half-written.

Example::

    $ snnopt compile examples/seed_network_model.py --out seed_opt --graph seed.svg
"""

from __future__ import annotations

import importlib
from importlib import metadata

import typer

app = typer.Typer(
    name="snnopt",
    help="snnopt: fused spiking-neuron ops with the sparse spiking gradient for PyTorch.",
    no_args_is_help=True,
    add_completion=True,
    rich_markup_mode="rich",
)


def _distribution_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _importable_version(module_name: str) -> str | None:
    """The module's version if it imports, else None (a broken install counts as absent)."""
    try:
        module = importlib.import_module(module_name)
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None
    return getattr(module, "__version__", "unknown version")


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"snnopt {_distribution_version('snnopt') or 'unknown (not installed)'}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True,
                                 help="Print the snnopt version and exit."),
) -> None:
    """snnopt: fused spiking-neuron ops with the sparse spiking gradient for PyTorch."""


@app.command()
def info() -> None:
    """Print the versions snnopt runs with and the backends available on this machine."""
    torch_version = _importable_version("torch")
    numba_version = _importable_version("numba")
    triton_version = _importable_version("triton")
    cuda = False
    if torch_version is not None:
        import torch

        cuda = torch.cuda.is_available()

    def show(version: str | None) -> str:
        return version if version is not None else "not importable"

    typer.echo(f"snnopt   {_distribution_version('snnopt') or 'unknown (not installed)'}")
    typer.echo(f"torch    {show(torch_version)}" + (f" (CUDA {'available' if cuda else 'not available'})"
                                                     if torch_version is not None else ""))
    typer.echo(f"numba    {show(numba_version)}")
    typer.echo(f"triton   {show(triton_version)}")
    backends = []
    if torch_version is not None and numba_version is not None:
        backends.append("cpu (numba kernels)")
    if triton_version is not None:
        backends.append("triton (generated kernels; " + ("CUDA available" if cuda else
                                                           "no CUDA here: only under TRITON_INTERPRET=1") + ")")
    typer.echo("backends " + (", ".join(backends) if backends else "none: install torch and numba"))


from cli.commands import register  # noqa: E402  (imports no torch either)

register(app)

if __name__ == "__main__":
    app()
