"""The `dynify` command line: one Typer app, thin commands over the Python API.

Each command module registers its commands on `app`; every DynifyError becomes a one-paragraph
message and exit code 2, never a traceback.
"""

from __future__ import annotations

from dynify.cli.app import app, main

# Importing the command modules registers their commands on the app.
from dynify.cli import convert as _convert  # noqa: F401  isort: skip
from dynify.cli import export as _export  # noqa: F401  isort: skip
from dynify.cli import train as _train  # noqa: F401  isort: skip

__all__ = ["app", "main"]
