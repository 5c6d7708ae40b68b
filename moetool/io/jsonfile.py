"""Strict JSON reading for files that come from users (config.json, index files, headers), and the one rule
for numbers in moetool's own JSON documents (:func:`json_number`).

Python's ``json`` accepts duplicate keys (the last one wins), ``NaN``/``Infinity`` literals, and
raises ``RecursionError`` on deeply nested input: each of these is refused here with one clear line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from moetool.errors import MoetoolError


def json_number(value: Any) -> Any:
    """A figure for a ``--json`` document: JSON has no inf/NaN, so a non-finite float (an overflowing
    perplexity) is written as null; anything else passes unchanged."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON literal {name}")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def loads_strict(text: str | bytes, *, what: str, error: type[MoetoolError], hint: str | None = None) -> Any:
    """Parse JSON text, refusing duplicate keys, NaN/Infinity and pathological nesting.

    Args:
        text: the JSON document (bytes must be UTF-8).
        what: how to name the document in the error message (for example ``"config.json at /m"``).
        error: the :class:`MoetoolError` subclass to raise.
        hint: the hint carried by the error.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise error(f"{what} is not valid UTF-8", hint=hint) from None
    except RecursionError:
        raise error(f"{what} is nested too deeply to be a real file", hint=hint) from None
    except ValueError as exc:  # JSONDecodeError is a ValueError
        raise error(f"{what} is not valid JSON: {exc}", hint=hint) from None


def load_json_file(path: Path, *, what: str, error: type[MoetoolError], hint: str | None = None) -> Any:
    """Read and strictly parse a JSON file; a missing or unreadable file raises ``error`` too."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{what} not found: {path}", hint=hint) from None
    except OSError as exc:
        raise error(f"cannot read {what} ({path}): {exc.strerror}", hint=hint) from None
    return loads_strict(data, what=what, error=error, hint=hint)
