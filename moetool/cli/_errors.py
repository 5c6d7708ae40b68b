"""Turning exceptions into one line and an exit code (the CLI's error contract).

Exit codes: 0 ok, 1 error or refused input, 2 usage, 3 a threshold failed, 130 interrupted.
Tracebacks only with ``MOETOOL_DEBUG=1``.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import typer
from rich.markup import escape

from moetool.cli._output import debug_enabled, print_json, printable, stderr, warn
from moetool.errors import EXIT_ERROR, EXIT_INTERRUPTED, MoetoolError, MoetoolWarning
from moetool.threads import restore_threads

F = TypeVar("F", bound=Callable[..., Any])

SCHEMA_VERSION = 1


def report_error(exc: MoetoolError, *, json_mode: bool = False) -> None:
    """Print the error as one line on stderr (and as a JSON document on stdout in --json mode)."""
    line = f"[bold red]error:[/bold red] {escape(printable(exc.message))}"
    if exc.hint:
        line += f" [dim]({escape(printable(exc.hint))})[/dim]"
    stderr().print(line, highlight=False, soft_wrap=True)
    if json_mode:
        print_json({"schema_version": SCHEMA_VERSION, "error": exc.to_dict()})


@contextmanager
def moetool_warnings() -> Iterator[None]:
    """Show the library's :class:`~moetool.errors.MoetoolWarning` as ``warning:`` lines on stderr.

    Every one is shown (not once per code location, Python's default); other warnings keep their
    usual display.
    """
    with warnings.catch_warnings():
        previous = warnings.showwarning
        warnings.simplefilter("always", MoetoolWarning)

        def show(message: Any, category: type[Warning], filename: str, lineno: int, *args: Any, **kw: Any) -> None:
            if issubclass(category, MoetoolWarning):
                warn(str(message))
            else:
                previous(message, category, filename, lineno, *args, **kw)

        warnings.showwarning = show  # catch_warnings() puts the original back
        yield


def handle_errors(func: F) -> F:
    """Decorate a command: MoetoolError -> one line + its exit code; Ctrl-C -> 130; bugs -> 1.

    The command's ``json_output`` keyword (if any) selects the JSON error document.
    """

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        json_mode = bool(kwargs.get("json_output", False))
        try:
            with moetool_warnings():
                return func(*args, **kwargs)
        except typer.Exit:
            raise
        except MoetoolError as exc:
            if debug_enabled():
                stderr().print_exception()
            report_error(exc, json_mode=json_mode)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            stderr().print("[bold red]interrupted[/bold red]; nothing was written")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except Exception as exc:
            if debug_enabled():
                raise
            error = MoetoolError(
                f"internal error: {type(exc).__name__}: {exc}",
                hint="this is a bug in moetool; rerun with MOETOOL_DEBUG=1 for the traceback and report it",
                code="INTERNAL",
            )
            report_error(error, json_mode=json_mode)
            raise typer.Exit(EXIT_ERROR) from None
        finally:
            # A command's --threads applies to that command only (callers in the same process, tests
            # among them, keep their own setting).
            restore_threads()

    return wrapper  # type: ignore[return-value]
