"""The Typer app, its error handling and the options several commands share."""

from __future__ import annotations

import datetime
import functools
import os
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, TypeVar

import typer
from rich.console import Console
from rich.panel import Panel

import dynify
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
        except OSError as exc:  # disk full, permissions, a path that vanished: the user's to fix
            where = f" {exc.filename}" if exc.filename else ""
            err_console.print(
                Panel(
                    f"Could not read or write{where}: {exc.strerror or exc}. Check the path, its "
                    "permissions and the free disk space, then run the command again.",
                    title=type(exc).__name__,
                    border_style="red",
                )
            )
            raise typer.Exit(USER_ERROR_EXIT_CODE) from None
        except KeyboardInterrupt:
            err_console.print("[yellow]Interrupted.[/yellow]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def parse_shape(text: str | None) -> tuple[int, ...] | None:
    """'1,60' -> (1, 60); None stays None."""
    if text is None:
        return None
    try:
        shape = tuple(int(part) for part in text.replace("x", ",").split(","))
    except ValueError:
        raise DynifyError(
            f"--input-shape takes whole numbers separated by commas, batch first (e.g. 1,60); "
            f"got '{text}'."
        ) from None
    if any(d < 1 for d in shape):
        raise DynifyError(f"--input-shape sizes must be at least 1; got '{text}'.")
    return shape


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
    typer.Option(
        "--input-size", min=1, help="Input resolution (default: the model's own, else 224)."
    ),
]
InputShapeOption = Annotated[
    str | None,
    typer.Option(
        "--input-shape",
        help="The input's shape, batch first, for inputs that are not images: '1,60' for 60 "
        "token ids (with --input-dtype int64). Overrides --input-size.",
    ),
]
InputDtypeOption = Annotated[
    str,
    typer.Option(
        "--input-dtype", help="The input's dtype with --input-shape: float32, or int64 for ids."
    ),
]
LengthsOption = Annotated[
    bool,
    typer.Option(
        "--lengths",
        help="The model is called as forward(x, lengths): with --input-shape, a padded "
        "sequence and each sample's length (int64 [B]).",
    ),
]
MaskOption = Annotated[
    bool,
    typer.Option(
        "--mask",
        help="The model is called as forward(x, mask): with --input-shape, a padded sequence "
        "and its padding mask ([B, T], 1 = real token, padding at the end).",
    ),
]
MaskDtypeOption = Annotated[
    str, typer.Option("--mask-dtype", help="The padding mask's dtype with --mask: bool or int64.")
]


def extra_input_of(lengths: bool, mask: bool, mask_dtype: str = "bool") -> str | None:
    """The API's `extra_input` from the --lengths / --mask flags."""
    if lengths and mask:
        raise DynifyError("Give --lengths or --mask, not both: forward takes one of them.")
    if lengths:
        return "lengths"
    return f"mask:{mask_dtype}" if mask else None


LeafOption = Annotated[
    list[str] | None,
    typer.Option(
        "--leaf",
        help="Keep this submodule whole when tracing: a qualified name, class name or "
        "pkg.mod:Class. Repeatable.",
    ),
]
TrustImportOption = Annotated[
    list[str] | None,
    typer.Option(
        "--trust-import",
        help="Let loading the artifact import this model reference (pkg.mod:build_net), which "
        "it never does otherwise. Only for code you trust. Repeatable.",
    ),
]


def load_artifact(artifact: Path, trust_import: Sequence[str] | None) -> dynify.DynamicModel:
    """`dynify.load`, importing only the references the user named with --trust-import."""
    return dynify.load(artifact, trust_imports=list(trust_import or ()))


def check_output(path: Path, what: str, inputs: Sequence[Path | None] = ()) -> str | None:
    """Refuse an output path before any work: a folder, a place that cannot be written, or one
    of the command's input files (say, an artifact about to be replaced by ONNX).

    Returns a note naming the file the output will replace, or None for a new file: every
    command overwrites an existing output, atomically, and says what it replaced.
    """
    if path.is_dir():
        raise DynifyError(f"The {what} {path} is a folder; name a file to write.")
    for source in inputs:
        if source is not None and source.exists() and path.exists() and path.samefile(source):
            raise DynifyError(
                f"The {what} {path} is also an input of this command; writing it would destroy "
                "the input. Name another file."
            )
    _check_writable(path.parent, what, path)
    if not path.exists():
        return None
    stat = path.stat()
    when = datetime.datetime.fromtimestamp(stat.st_mtime).strftime("%Y-%m-%d %H:%M")
    return f"the previous {path} ({_size(stat.st_size)}, modified {when})"


def check_output_folder(folder: Path, what: str) -> str | None:
    """Like `check_output`, for a folder files are written into."""
    if folder.exists() and not folder.is_dir():
        raise DynifyError(f"The {what} {folder} is a file; name a folder to write into.")
    if folder.is_dir():
        _check_writable(folder, what, folder)
        count = sum(1 for _ in folder.iterdir())
        return f"files of the same names among the {count} already in {folder}" if count else None
    _check_writable(folder.parent, what, folder)
    return None


def _check_writable(folder: Path, what: str, target: Path) -> None:
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    else:
        try:
            fd, probe = tempfile.mkstemp(dir=existing, prefix=".dynify-probe-")
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            problem = f"{existing} cannot be written ({exc.strerror or exc})"
    if problem:
        raise DynifyError(f"Cannot write the {what} {target}: {problem}. Name a writable place.")


def wrote(path: Path, replaced: str | None, extra: str = "") -> None:
    """The line every command prints after writing an output."""
    note = f"; it replaced {replaced}" if replaced else ""
    console.print(f"Wrote [bold]{path}[/bold]{extra}{note}.")


def _size(n: int) -> str:
    return f"{n / 2**20:.1f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"


def main() -> None:
    app(prog_name="dynify")


if __name__ == "__main__":
    sys.exit(main())
