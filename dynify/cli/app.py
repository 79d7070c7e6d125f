"""The Typer app, its error handling and the options several commands share."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.panel import Panel

from dynify.errors import DynifyError

app = typer.Typer(
    name="dynify",
    help="Turn a trained static PyTorch network into a dynamic one.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
err_console = Console(stderr=True)

USER_ERROR_EXIT_CODE = 2

F = TypeVar("F", bound=Callable)


def user_errors(command: F) -> F:
    """Show a DynifyError as a short message with exit code 2 instead of a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except DynifyError as exc:
            err_console.print(Panel(str(exc), title=type(exc).__name__, border_style="red"))
            raise typer.Exit(USER_ERROR_EXIT_CODE) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]Interrupted.[/yellow]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def command(*args, **kwargs) -> Callable[[F], F]:
    """`app.command` with user-error handling."""

    def decorate(func: F) -> F:
        app.command(*args, **kwargs)(user_errors(func))
        return func

    return decorate


ArtifactArg = Annotated[Path, typer.Argument(help="A .dyn artifact written by `dynify convert`.")]
DataOption = Annotated[
    str,
    typer.Option(
        "--data", help="An ImageFolder directory, a zip of one, or a torchvision data set name."
    ),
]
InputSizeOption = Annotated[
    int | None,
    typer.Option("--input-size", help="Input resolution (default: the model's own, else 224)."),
]
LeafOption = Annotated[
    list[str] | None,
    typer.Option(
        "--leaf",
        help="Keep this submodule whole when tracing: a qualified name, class name or "
        "pkg.mod:Class. Repeatable.",
    ),
]


def main() -> None:
    app(prog_name="dynify")


if __name__ == "__main__":
    sys.exit(main())
