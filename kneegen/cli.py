"""The `kneegen` console script: a Typer app whose subcommands are entry-point plugins.

Every subcommand, built-in or third-party, is registered in the entry-point group
`kneegen.commands`: a function becomes a command, a Typer app becomes a command group.
Whatever goes wrong in any of them ends in one line on stderr and exit status 1: a
`KneegenError` as it is, a file-system or memory error with what to do about it, and anything
else (a bug) with the path of a log file that holds the traceback (`--debug` or
`KNEEGEN_DEBUG=1` shows it instead).
"""

from __future__ import annotations

import errno
import functools
import os
import tempfile
import time
import traceback
from collections.abc import Callable
from importlib.metadata import entry_points, version
from pathlib import Path
from typing import Annotated, Any

import click
import typer
import yaml
from rich.markup import escape

from kneegen.errors import KneegenError
from kneegen.progress import console

COMMAND_GROUP = "kneegen.commands"
DEBUG_VARIABLE = "KNEEGEN_DEBUG"
debugging = {"on": False}  # set by --debug for this invocation


def build_app() -> typer.Typer:
    """A fresh app with every installed `kneegen.commands` plugin registered."""
    app = typer.Typer(
        name="kneegen",
        help="Train diffusion models on knee MRI slices and generate new ones.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )
    debugging["on"] = False
    app.callback()(options)
    for plugin in sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name):
        command = plugin.load()
        if isinstance(command, typer.Typer):
            for registered in command.registered_commands:
                registered.callback = reporting_user_errors(registered.callback)
            app.add_typer(command, name=plugin.name)
        else:
            app.command(name=plugin.name)(reporting_user_errors(command))
    return app


def print_version(asked: bool) -> None:
    if asked:
        console.print(f"kneegen {version('kneegen')}", highlight=False)
        raise typer.Exit(0)


def options(
    show_version: Annotated[
        bool, typer.Option("--version", help="Print kneegen's version and exit.", is_eager=True, callback=print_version)
    ] = False,
    debug: Annotated[
        bool, typer.Option("--debug", help=f"Show the traceback of an unexpected error (or {DEBUG_VARIABLE}=1).")
    ] = False,
) -> None:
    """Train diffusion models on knee MRI slices and generate new ones."""
    debugging["on"] = debug


def reporting_user_errors(function: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """Turn any failure into one line on stderr and exit status 1, without a traceback."""
    if function is None or getattr(function, "reports_user_errors", False):
        return function

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException):
            raise  # Typer's own exits and usage errors
        except Exception as error:  # noqa: BLE001 - this is the one place every failure is reported
            if debugging["on"] or os.environ.get(DEBUG_VARIABLE) == "1":
                raise
            console.print(f"[bold red]error:[/] {escape(describe(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(error, "exit_code", 1)) from None

    wrapper.reports_user_errors = True  # type: ignore[attr-defined]
    return wrapper


def describe(error: Exception) -> str:
    """One line: the problem, the file or key it concerns, and what to do."""
    if isinstance(error, KneegenError):
        return str(error)
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"no space left on the disk writing {error.filename or 'output'}: free some space or write elsewhere"
    if isinstance(error, PermissionError):
        return f"permission denied: {error.filename}: choose a path you can write to, or change its permissions"
    if isinstance(error, (NotADirectoryError, FileExistsError)):
        return f"{error.filename}: a file stands where a folder is needed (or the reverse): choose another path"
    if isinstance(error, FileNotFoundError):
        return f"{error.filename} not found: check the path"
    if isinstance(error, OSError):
        return f"{error.filename or 'input/output'}: {error.strerror or error}: check the path and the disk"
    if isinstance(error, MemoryError):
        return "out of memory: lower the image size, batch size or number of images asked for"
    if isinstance(error, yaml.YAMLError):
        return f"not valid YAML ({error.__class__.__name__}): check the --set value or the config file"
    return (
        f"unexpected {error.__class__.__name__}: {error} (a bug; traceback in {write_crash_log(error)}, "
        f"or rerun with --debug)"
    )


def write_crash_log(error: Exception) -> Path:
    """The full traceback in a log file, so the one-line report can point at it."""
    path = Path(tempfile.gettempdir()) / f"kneegen-crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text("".join(traceback.format_exception(error)))
    return path


def main() -> None:
    build_app()()
