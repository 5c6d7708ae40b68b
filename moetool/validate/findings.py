"""What validation reports: :class:`Finding` objects, and the typed error a command raises for them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from moetool.errors import CheckpointError, ConfigError, MoetoolError, ShapeMismatchError

#: Levels of a finding. ``fatal``: the config cannot even be counted (inspect fails too); ``error``:
#: commands refuse (inspect warns, or fails with ``--strict``); ``warning``: reported, never refused.
FATAL, ERROR, WARNING = "fatal", "error", "warning"


# How many problems a one-line message names before it gives a count.
SHOWN = 3

HINT_CONFIG = "fix config.json (it must describe the weights stored beside it), or re-download the checkpoint"
HINT_SHAPES = "config.json and the weights belong to different models: re-download the checkpoint or fix config.json"
HINT_MISSING = "the checkpoint is incomplete: re-download it (hf download REPO), or re-save it with transformers"
HINT_QUANTIZED = "pass the original float16/bfloat16/float32 checkpoint, or dequantize this one first"


@dataclass(frozen=True)
class Finding:
    """One problem of a checkpoint.

    Attributes:
        code: stable identifier (``CONFIG_INVALID``, ``SHAPE_MISMATCH``, ``EXPERT_MISSING``, ...).
        message: one line naming the field or tensor, what was found and what was expected.
        hint: what to do about it.
        level: :data:`FATAL`, :data:`ERROR` or :data:`WARNING`.
        path: the JSON path of the config.json field it is about, when it is about one.
    """

    code: str
    message: str
    hint: str | None = None
    level: str = ERROR
    path: str | None = None

    def to_json(self) -> dict[str, Any]:
        doc = {"code": self.code, "level": self.level, "message": self.message, "hint": self.hint}
        if self.path is not None:
            doc["path"] = self.path
        return doc


@dataclass
class Validation:
    """What :func:`check_input` found (it raises on errors, so what is left is for the record).

    Attributes:
        findings: warnings (and, with ``raise_errors=False``, errors).
        nonfinite: the tensors holding NaN/Inf, ``None`` when values were not scanned.
    """

    findings: list[Finding] = field(default_factory=list)
    nonfinite: list[Any] | None = None

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.level in (FATAL, ERROR)]


def type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    return {int: "an integer", float: "a number", str: "a string", list: "a list", dict: "an object"}.get(
        type(value), type(value).__name__
    )


def show(value: Any) -> str:
    from moetool.io.safetensors_header import short_repr

    return short_repr(value, 60)


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def summary(items: list[str], what: str) -> str:
    if len(items) == 1:
        return items[0]
    more = f"; and {len(items) - SHOWN} more" if len(items) > SHOWN else ""
    return f"{len(items)} {what}: {'; '.join(items[:SHOWN])}{more}"


def fatal_first(findings: list[Finding]) -> list[Finding]:
    order = {FATAL: 0, ERROR: 1, WARNING: 2}
    return sorted(findings, key=lambda f: order.get(f.level, 1))


_ERROR_CLASSES: dict[str, type[MoetoolError]] = {
    "SHAPE_MISMATCH": ShapeMismatchError,
    "EXPERT_MISSING": CheckpointError,
    "TENSOR_MISSING": CheckpointError,
    "QUANTIZED_INPUT": CheckpointError,
    "DTYPE_INVALID": CheckpointError,
}


def as_error(findings: list[Finding], name: str) -> MoetoolError | None:
    """The typed error a command raises for these findings (``None`` when none is an error).

    The message is the first error's; when there are more, it says how many and the hint points at
    ``moetool inspect``, which lists them all.
    """
    errors = [f for f in findings if f.level in (FATAL, ERROR)]
    if not errors:
        return None
    first = errors[0]
    message = f"{name}: {first.message}"
    hint = first.hint
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem(s))"
        hint = (hint + "; " if hint else "") + f"`moetool inspect {name}` lists them all"
    cls = _ERROR_CLASSES.get(first.code, ConfigError)
    return cls(message, hint=hint, code=first.code)
