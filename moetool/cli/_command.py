"""The command classes behind every ``moetool`` command: help that reads right, usage errors in JSON.

typer 0.29 prints a type after every option in ``--help``, flags included (``--json <bool>``), which
reads as if the flag took a value. :class:`MoetoolCommand` and :class:`MoetoolGroup` give flags an
empty metavar, so ``--help`` shows ``--json`` alone; options that take a value keep their type.

A usage error (unknown option, missing option, a value of the wrong type) is raised by the parser
before the command runs, so the command's own ``--json`` error handling never sees it and typer
prints its box. When ``--json`` is on the command line, these classes print the JSON error document
instead (``schema_version`` 1, ``error`` with ``code`` ``USAGE``, ``message``, ``hint``, ``exit_code`` 2)
and exit 2, with the one-line error on stderr.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import typer
from typer.core import TyperCommand, TyperGroup

from moetool.errors import EXIT_USAGE, UsageError

__all__ = ["MoetoolCommand", "MoetoolGroup", "json_requested"]

_JSON_FLAG = "--json"


def json_requested(args: Sequence[str]) -> bool:
    """Whether ``--json`` is among the options (before a ``--`` that ends them)."""
    for arg in args:
        if arg == "--":
            return False
        if arg == _JSON_FLAG:
            return True
    return False


def _hide_flag_types(params: list[Any]) -> list[Any]:
    for param in params:
        # A flag takes no value: an empty metavar keeps typer from printing "<bool>" after it.
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


def _is_usage_error(exc: BaseException) -> bool:
    # typer's parser errors (its vendored click's UsageError family) carry an exit code and a
    # format_message(); typer does not export their classes, so they are recognised by that shape.
    return (
        not isinstance(exc, typer.Exit)
        and callable(getattr(exc, "format_message", None))
        and getattr(exc, "exit_code", None) == EXIT_USAGE
    )


def _json_usage_error(exc: BaseException, ctx: Any) -> typer.Exit:
    from moetool.cli._errors import report_error

    command = getattr(ctx, "command_path", None) or "moetool"
    error = UsageError(exc.format_message().rstrip("."), hint=f"see `{command} --help`")  # type: ignore[attr-defined]
    report_error(error, json_mode=True)
    return typer.Exit(error.exit_code)


class _MoetoolParsing:
    """What every moetool command and the group share: flags without a type label in ``--help``, and a
    usage error under ``--json`` printed as the JSON error document."""

    def get_params(self, ctx: Any) -> list[Any]:
        """The parameters (help option included), flags without a type label."""
        return _hide_flag_types(super().get_params(ctx))  # type: ignore[misc]

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Parse the command line; with ``--json``, a usage error becomes the JSON error document."""
        wants_json = json_requested(args)
        try:
            return super().parse_args(ctx, args)  # type: ignore[misc]
        except Exception as exc:
            if wants_json and _is_usage_error(exc):
                raise _json_usage_error(exc, ctx) from None
            raise


class MoetoolCommand(_MoetoolParsing, TyperCommand):
    """A typer command whose flags show no type in ``--help`` and whose usage errors honour ``--json``."""


class MoetoolGroup(_MoetoolParsing, TyperGroup):
    """The ``moetool`` group: like :class:`MoetoolCommand`, also for unknown commands and root options."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        """Find the subcommand; an unknown one with ``--json`` gives the JSON error document."""
        try:
            return super().resolve_command(ctx, args)
        except Exception as exc:
            if json_requested(args) and _is_usage_error(exc):
                raise _json_usage_error(exc, ctx) from None
            raise
