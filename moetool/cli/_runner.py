"""Opening a model for the commands that run one: the plan line (streamed or whole, memory) on stderr."""

from __future__ import annotations

from typing import Any

from moetool.cli._output import stderr


def memory_plan(opened: Any, *, tokens: int, enabled: bool = True) -> dict[str, Any]:
    """Print how the model will run and what it will hold at once; return the figures for ``--json``.

    Args:
        opened: an :class:`moetool.runner.open.OpenedRunner`.
        tokens: the token positions of one pass (what the activations hold).
        enabled: print the line (not in ``--json`` mode... the line goes to stderr either way, but a
            quiet run asks for none).
    """
    from moetool.runner.memory import estimate, human

    runner = opened.runner
    dtype = str(getattr(runner, "dtype", None) or next(runner.model.parameters()).dtype).removeprefix("torch.")
    figures = estimate(opened.checkpoint, dtype)
    if opened.streamed:
        tokens = min(tokens, getattr(runner, "segment_tokens", tokens))
        peak = figures.streamed_peak(tokens)
        how = (
            f"streaming {figures.layers} layers one at a time on {runner.device} ({dtype}): largest layer "
            f"{human(figures.largest_layer_bytes)}, activations of {tokens:,} tokens "
            f"{human(figures.activations(tokens))}, peak about {human(peak)}"
        )
    else:
        peak = figures.whole_peak(tokens)
        weights = human(figures.weights_by_dtype.get(dtype, 0))
        how = f"whole model in memory on {runner.device} ({dtype}): weights {weights}"
    for note in opened.notes:
        how += f"; {note}"
    if enabled:
        stderr().print(f"[dim]{how}[/dim]", highlight=False)
    doc = figures.to_json(tokens)
    doc["streamed"] = opened.streamed
    doc["peak_bytes"] = peak
    return doc
