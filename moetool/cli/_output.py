"""Where output goes: results on stdout, everything else (progress, logs, errors) on stderr."""

from __future__ import annotations

import json
import os
import sys
from functools import cache
from typing import Any

from rich.console import Console
from rich.markup import escape

_quiet = False


def set_quiet(quiet: bool) -> None:
    """``moetool -q``: nothing on stdout but the ``--json`` document, nothing on stderr but errors."""
    global _quiet
    _quiet = bool(quiet)
    stdout().quiet = _quiet


def quiet() -> bool:
    """Whether ``-q`` asked for errors only."""
    return _quiet


@cache
def stdout() -> Console:
    """Console for results (tables); the --json document bypasses it (plain sys.stdout)."""
    return Console(soft_wrap=False, quiet=_quiet)


@cache
def stderr() -> Console:
    """Console for progress bars, warnings and errors."""
    return Console(stderr=True)


def debug_enabled() -> bool:
    """Whether ``MOETOOL_DEBUG`` asks for tracebacks."""
    return os.environ.get("MOETOOL_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def printable(text: str) -> str:
    """``text`` with any lone surrogate written as a ``\\udcff`` escape.

    Python decodes file names and arguments that are not valid UTF-8 into lone surrogates
    (``surrogateescape``); written out as they are, they either crash the write or put invalid UTF-8
    on the terminal or in a JSON document.
    """
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def with_versions(document: Any) -> Any:
    """The document with a ``versions`` object added (moetool, Python, torch, transformers, ...).

    Every versioned document (one with ``schema_version``) records the code that produced it; a
    ``versions`` key the command set itself is kept.
    """
    if isinstance(document, dict) and "schema_version" in document and "versions" not in document:
        from moetool.versions import versions

        return {**document, "versions": versions()}
    return document


def print_json(document: Any) -> None:
    """Write one JSON document to stdout (plain, never wrapped or coloured), always valid UTF-8, with
    :func:`with_versions`.

    A lone surrogate (a non-UTF-8 file name) comes out as the JSON escape ``\\udcff``, which parsers
    read back as the same Python string, never as a raw invalid byte.
    """
    document = with_versions(document)
    sys.stdout.write(printable(json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False)) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    """One warning line on stderr (none under ``-q``; the message is plain text: brackets in it are not markup)."""
    if _quiet:
        return
    stderr().print(
        f"[yellow]warning:[/yellow] {escape(printable(message))}", highlight=False, markup=True, soft_wrap=True
    )


def human_count(n: int | float) -> str:
    """1_234_567_890 -> '1.23B' (the way model sizes are usually written)."""
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def human_bytes(n: int) -> str:
    """Bytes in decimal units (as shard sizes are written: 5GB)."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
