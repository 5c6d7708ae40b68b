"""Progress display shared by the commands that run a model: a token bar and a loading spinner."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from rich.progress import BarColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from moetool.cli._output import quiet, stderr

if TYPE_CHECKING:
    from rich.progress import Task


class _TokensPerSecond(ProgressColumn):
    """Throughput in tokens per second (rich's speed columns speak bytes)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.0f} tok/s" if speed else "- tok/s", style="progress.data.speed")


def progress_enabled(json_output: bool) -> bool:
    """Progress is drawn only for a person watching: not with --json or -q, not when stderr is not a terminal."""
    return not json_output and not quiet() and stderr().is_terminal


@contextlib.contextmanager
def token_progress(description: str, total: int | None, *, enabled: bool) -> Iterator[Callable[[int], None]]:
    """A transient progress bar on stderr counting tokens; yields ``advance(n_tokens)``.

    Args:
        description: what is being done.
        total: the expected number of tokens (``None``: unknown; the bar then only counts).
        enabled: False draws nothing (``--json``, or stderr not a terminal).
    """
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,.0f} tokens"),
        _TokensPerSecond(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=stderr(),
        transient=True,
        disable=not enabled,
    )
    with progress:
        task = progress.add_task(description, total=total)

        def advance(tokens: int) -> None:
            progress.advance(task, tokens)

        yield advance


@contextlib.contextmanager
def status(message: str, *, enabled: bool) -> Iterator[None]:
    """A transient spinner on stderr while something without a measurable length runs (loading)."""
    if not enabled:
        yield
        return
    with stderr().status(message):
        yield


def note_printer(*, enabled: bool) -> Callable[[str], None]:
    """A function printing one dim progress line on stderr per stage (nothing when ``enabled`` is false)."""

    def note(message: str) -> None:
        if enabled:
            stderr().print(f"[dim]{message}[/dim]", highlight=False)

    return note
