"""The `kneegen` console script: a Typer app whose subcommands are entry-point plugins.

Every subcommand, built-in or third-party, is registered in the entry-point group
`kneegen.commands`: a function becomes a command, a Typer app becomes a command group.
Whatever goes wrong in any of them ends in one line on stderr and exit status 1: a
`KneegenError` as it is, a file-system or memory error with what to do about it, and anything
else (a bug) with the path of a log file that holds the traceback (`--debug` or
`KNEEGEN_DEBUG=1` shows it instead). A usage error (an unknown option, a missing argument, a
value of the wrong type) is one line too, naming the command and its --help, with exit status 2.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points, version
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.markup import escape
from typer.core import TyperGroup

from kneegen.errors import KneegenError
from kneegen.interruption import Interrupted
from kneegen.progress import console

COMMAND_GROUP = "kneegen.commands"
DEBUG_VARIABLE = "KNEEGEN_DEBUG"
debugging = {"on": False}  # set by --debug for this invocation
# The exceptions of the click that Typer parses with: its own copy since Typer 0.2x, the click package before.
click_errors = sys.modules[typer.BadParameter.__module__]
NEGATIVE_NUMBER = re.compile(r"-\d+")  # `generate -3`: click reads it as an option
# How torch says an allocation failed (a RuntimeError): on a GPU, or on the CPU (DefaultCPUAllocator).
TORCH_OUT_OF_MEMORY = re.compile(r"out of memory|can't allocate memory", re.IGNORECASE)


class OneLineUsageErrors(TyperGroup):
    """A command group whose usage errors, its own and its commands', end in one line on stderr
    (exit status 2), not in Typer's five-line box; the help that `kneegen` alone prints stays."""

    def make_context(self, info_name: str | None, args: list[str], parent: Any = None, **extra: Any) -> Any:
        with usage_errors_in_one_line(lambda: " ".join(filter(None, (parent and parent.command_path, info_name)))):
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: Any) -> Any:
        with usage_errors_in_one_line(lambda: " ".join(filter(None, (ctx.command_path, ctx.invoked_subcommand)))):
            return super().invoke(ctx)


def build_app() -> typer.Typer:
    """A fresh app with every installed `kneegen.commands` plugin registered."""
    app = typer.Typer(
        name="kneegen",
        help="Train diffusion models on knee MRI slices and generate new ones.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        cls=OneLineUsageErrors,
    )
    debugging["on"] = False
    app.callback()(options)
    for plugin in sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name):
        command = plugin.load()
        if isinstance(command, typer.Typer):
            for registered in command.registered_commands:
                registered.callback = reporting_user_errors(registered.callback)
            app.add_typer(command, name=plugin.name, cls=OneLineUsageErrors)
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
        except (typer.Exit, typer.Abort, click_errors.ClickException):
            raise  # Typer's own exits and usage errors
        except KeyboardInterrupt:  # a second Ctrl-C in training, or the first anywhere else
            report_interruption()
            raise typer.Exit(Interrupted.exit_code) from None
        except Exception as error:  # noqa: BLE001 - this is the one place every failure is reported
            if debugging["on"] or os.environ.get(DEBUG_VARIABLE) == "1":
                raise
            console.print(f"[bold red]error:[/] {escape(describe(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(getattr(error, "exit_code", 1)) from None

    wrapper.reports_user_errors = True  # type: ignore[attr-defined]
    return wrapper


@contextlib.contextmanager
def usage_errors_in_one_line(command_path: Callable[[], str]) -> Iterator[None]:
    """Print a usage error raised inside as one line naming the command (`command_path()`, the
    command being parsed, where click's error does not say which) and exit with its status."""
    try:
        yield
    except click_errors.ClickException as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # `kneegen` alone: the help it printed is the answer
            raise
        path = error.ctx.command_path if error.ctx is not None else command_path()
        console.print(f"[bold red]error:[/] {escape(usage_line(error, path))}", highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None


def usage_line(error: Any, path: str) -> str:
    """ "kneegen train: no such option: --epoch (Possible options: --epochs) (see 'kneegen train --help')"."""
    option = getattr(error, "option_name", "")
    counts = counts_of(error.ctx) if NEGATIVE_NUMBER.fullmatch(option) else []
    if counts:
        problem = f"{counts[0]} must be a positive integer; {option} reads as an option"
    else:
        message = " ".join(error.format_message().split())
        problem = message[:1].lower() + message[1:].rstrip(".")
    return f"{path}: {problem} (see '{path} --help')"


def counts_of(ctx: Any) -> list[str]:
    """The names of the command's arguments that take an integer, such as the N of `sample generate N`."""
    names = []
    for param in ctx.command.params if ctx is not None else []:
        if param.param_type_name == "argument":
            with contextlib.suppress(click_errors.ClickException):
                if isinstance(param.process_value(ctx, "1"), int):
                    names.append(param.name.upper())
    return names


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
    if isinstance(error, MemoryError) or (isinstance(error, RuntimeError) and TORCH_OUT_OF_MEMORY.search(str(error))):
        return "out of memory: lower the image size, batch size, model size (model.*) or number of images asked for"
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


def report_interruption() -> None:
    """Ctrl-C outside training's own handling (which saves and says how to resume): one line;
    the caller exits with the status shells give a command stopped by SIGINT."""
    console.print(
        "[bold red]interrupted:[/] stopped by Ctrl-C before it finished; run the command again", highlight=False
    )


def main() -> None:
    try:
        build_app()()
    except KeyboardInterrupt:  # while the plugins load, before a command runs
        report_interruption()
        sys.exit(Interrupted.exit_code)
