"""The CPU thread policy as the commands apply it: one call before the work, one line in the plan."""

from __future__ import annotations

from moetool.cli._output import stderr
from moetool.cli._progress import progress_enabled


def use_threads(requested: int, *, json_output: bool) -> int:
    """Set torch's CPU threads for this command (see :mod:`moetool.threads`) and say so on stderr.

    Args:
        requested: ``--threads`` (0: the idle cores, or ``OMP_NUM_THREADS`` when set).
        json_output: the command prints JSON (then the line is not printed; the JSON records the count).

    Returns:
        The thread count, for the command's ``--json`` document (``"threads"``).
    """
    from moetool.threads import apply_threads

    choice = apply_threads(requested)
    if progress_enabled(json_output):
        stderr().print(f"[dim]{choice.describe()}[/dim]", highlight=False)
    return choice.threads
