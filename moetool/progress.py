"""The one progress protocol: how library functions say what they are doing (the CLI draws it).

Every long-running library function (merge, upcycle, quantize, export, distill, evaluate, profile-routing)
takes ``progress: Progress | None`` and calls it as::

    progress(stage, advance, total, unit=..., detail=..., log=...)

* ``stage``: what is being done, in a few words (``"calibrating"``, ``"writing"``, ``"training"``);
* ``advance``: units done since the previous call for this stage; ``0`` with no unit announces a stage
  that has no measurable length (a status line: ``"opening the model"``);
* ``total``: the stage's length in units when known (``None``: unknown, the count only grows);
* ``unit``: ``"tokens"``, ``"bytes"``, ``"layers"``, ``"steps"``, or ``""`` for a status line;
* ``detail``: free text about the current state (distill's loss), shown beside the stage;
* ``log``: the detail belongs in a log too (a run without a terminal prints it as a line).

:mod:`moetool.cli._progress` renders it with rich on stderr; a library user passes any function of that
shape (or nothing). Nothing here imports torch or rich.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

__all__ = ["Progress", "report", "token_counter"]

TOKENS = "tokens"
BYTES = "bytes"
LAYERS = "layers"
STEPS = "steps"


class Progress(Protocol):
    """A progress callback (see the module docstring)."""

    def __call__(
        self,
        stage: str,
        advance: float = 0,
        total: float | None = None,
        *,
        unit: str = "",
        detail: str | None = None,
        log: bool = False,
    ) -> None: ...


def report(progress: Progress | None, stage: str) -> None:
    """Announce a stage without a measurable length (a status line), when there is a callback."""
    if progress is not None:
        progress(stage)


def token_counter(progress: Progress | None, stage: str, total: float | None) -> Callable[[float], None] | None:
    """A ``tokens -> None`` callback (what the runner's passes call) that reports ``stage`` in tokens."""
    if progress is None:
        return None

    def advance(tokens: float) -> None:
        progress(stage, tokens, total, unit=TOKENS)

    return advance
