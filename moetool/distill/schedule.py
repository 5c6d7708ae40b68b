"""The learning rate of each optimizer step: linear warmup, then cosine or linear decay (or constant).

A pure function of the step, so that a resumed run needs no scheduler object in its checkpoint: the step
number is the whole state.
"""

from __future__ import annotations

import math


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """The multiplier of the peak learning rate for optimizer step ``step`` (0-based).

    Args:
        step: the step about to be taken, ``0 <= step < total``.
        total: the number of steps of the run.
        warmup: steps of linear warmup; step 0 gets ``1 / warmup`` of the peak, step ``warmup - 1`` all of it.
        schedule: ``cosine`` or ``linear`` decay from the peak to ``min_ratio`` at the last step, or
            ``constant``.
        min_ratio: the final multiplier.

    Returns:
        The multiplier, in ``(0, 1]`` (``min_ratio`` may make the last steps 0).
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = total - warmup - 1
    progress = (step - warmup) / span if span > 0 else 1.0
    progress = min(max(progress, 0.0), 1.0)
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_ratio + (1.0 - min_ratio) * shape
