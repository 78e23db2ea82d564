"""The `kneegen` console script: a Typer app whose subcommands are entry-point plugins.

Every subcommand, built-in or third-party, is registered in the entry-point group
`kneegen.commands`: a function becomes a command, a Typer app becomes a command group.
A `KneegenError` from any of them is printed as one line on stderr with exit status 1.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from importlib.metadata import entry_points
from typing import Any

import typer

from rich.markup import escape

from kneegen.errors import KneegenError
from kneegen.progress import console

COMMAND_GROUP = "kneegen.commands"


def build_app() -> typer.Typer:
    """A fresh app with every installed `kneegen.commands` plugin registered."""
    app = typer.Typer(
        name="kneegen",
        help="Train diffusion models on knee MRI slices and generate new ones.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
    )
    for plugin in sorted(entry_points(group=COMMAND_GROUP), key=lambda ep: ep.name):
        command = plugin.load()
        if isinstance(command, typer.Typer):
            for registered in command.registered_commands:
                registered.callback = reporting_user_errors(registered.callback)
            app.add_typer(command, name=plugin.name)
        else:
            app.command(name=plugin.name)(reporting_user_errors(command))
    return app


def reporting_user_errors(function: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """Turn a KneegenError into one line on stderr and exit status 1, without a traceback."""
    if function is None or getattr(function, "reports_user_errors", False):
        return function

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except KneegenError as error:
            console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None

    wrapper.reports_user_errors = True  # type: ignore[attr-defined]
    return wrapper


def main() -> None:
    build_app()()
