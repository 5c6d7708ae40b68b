"""Where output goes: results on stdout, everything else (progress, logs, errors) on stderr."""

from __future__ import annotations

import json
import os
import sys
from functools import cache
from typing import Any

from rich.console import Console

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
    """Write one JSON document to stdout (plain, never wrapped or coloured), with :func:`with_versions`."""
    document = with_versions(document)
    sys.stdout.write(json.dumps(document, indent=2, ensure_ascii=False, allow_nan=False) + "\n")
    sys.stdout.flush()


def warn(message: str) -> None:
    """One warning line on stderr (none under ``-q``)."""
    if _quiet:
        return
    stderr().print(f"[yellow]warning:[/yellow] {message}", highlight=False, markup=True)


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
