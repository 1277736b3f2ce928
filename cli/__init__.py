"""The ``snnopt`` command line (a typer app in :mod:`cli.main`)."""
