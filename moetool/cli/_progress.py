"""The one progress renderer: draws :class:`moetool.progress.Progress` calls on stderr with rich.

:func:`progress_display` yields the callback every command passes to its library function: one transient
bar per stage that has a unit (tokens, bytes, layers, steps), with its count, speed, time and detail; a
dim line for a status call (a stage without a unit). It draws only for a person watching (not with
``--json`` or ``-q``, not when stderr is not a terminal); with ``log=True`` a run without a terminal gets
plain lines instead: each stage once, and the details the library marks as log lines. :func:`status` is a
spinner for CLI-side waits (loading a model, hashing files).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from rich import filesize
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from moetool.cli._output import quiet, stderr
from moetool.progress import BYTES, TOKENS

if TYPE_CHECKING:
    from rich.progress import Task

    from moetool.progress import Progress as ProgressCallback


def progress_enabled(json_output: bool) -> bool:
    """Progress is drawn only for a person watching: not with --json or -q, not when stderr is not a terminal."""
    return not json_output and not quiet() and stderr().is_terminal


class _Count(ProgressColumn):
    """How much of the stage is done, in its unit (bytes in decimal units, as --max-shard-size counts them)."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "")
        if unit == BYTES:
            done = filesize.decimal(int(task.completed))
            text = f"{done}/{filesize.decimal(int(task.total))}" if task.total else done
        elif task.total and unit != TOKENS:
            text = f"{task.completed:,.0f}/{task.total:,.0f} {unit}"
        else:
            text = f"{task.completed:,.0f} {unit}"
        return Text(text, style="progress.download")


class _Speed(ProgressColumn):
    """Throughput for tokens and bytes (the stages where it means something)."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "")
        speed = task.finished_speed or task.speed
        if unit == TOKENS:
            return Text(f"{speed:,.0f} tok/s" if speed else "- tok/s", style="progress.data.speed")
        if unit == BYTES:
            return Text(f"{filesize.decimal(int(speed))}/s" if speed else "", style="progress.data.speed")
        return Text("")


class _Detail(ProgressColumn):
    """The library's detail line for the stage (distill's loss and learning rate)."""

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("detail") or ""), style="progress.data.speed")


@contextlib.contextmanager
def progress_display(*, enabled: bool, log: bool = False) -> Iterator[ProgressCallback]:
    """Render library progress on stderr; yields the :class:`moetool.progress.Progress` callback.

    Args:
        enabled: draw bars and status lines (:func:`progress_enabled`).
        log: when not ``enabled`` and not quiet, print plain lines instead (for runs logged to a file).
    """
    plain = log and not enabled and not quiet()  # lines for a log file instead of bars
    bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        _Count(),
        _Speed(),
        _Detail(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr(),
        transient=True,
        disable=not enabled,
    )
    tasks: dict[str, int] = {}

    def progress(
        stage: str,
        advance: float = 0,
        total: float | None = None,
        *,
        unit: str = "",
        detail: str | None = None,
        log: bool = False,
    ) -> None:
        if not unit:
            if enabled:
                bars.console.print(f"[dim]{escape(stage)}[/dim]", highlight=False)
            elif plain:
                stderr().print(stage, highlight=False, markup=False)
            return
        if stage not in tasks:
            tasks[stage] = bars.add_task(stage, total=total, unit=unit, detail=detail)
            if plain and not detail:  # a stage with details logs those instead
                stderr().print(f"{stage} ...", highlight=False, markup=False)
        bars.update(tasks[stage], advance=advance, total=total, detail=detail)
        if plain and log and detail:
            stderr().print(detail, highlight=False, markup=False)

    with bars:
        yield progress


@contextlib.contextmanager
def status(message: str, *, enabled: bool) -> Iterator[None]:
    """A transient spinner on stderr while something without a measurable length runs (loading)."""
    if not enabled:
        yield
        return
    with stderr().status(message):
        yield
