"""One exception hierarchy for moetool.

Every error a user can cause is a :class:`MoetoolError` carrying a stable ``code`` (machine readable,
shown in ``--json`` error documents), a one-line ``message`` saying what is wrong and a ``hint`` saying
what to do. The CLI turns them into one line on stderr and the error's ``exit_code``; library users
catch them by class. Nothing here imports torch.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_THRESHOLD = 3
EXIT_INTERRUPTED = 130


class MoetoolError(Exception):
    """Base class of every error moetool raises on purpose.

    Args:
        message: what is wrong, naming the object (file, tensor, config field).
        hint: what the user can do about it.
        code: a stable upper-case identifier; defaults to the class's ``default_code``.
    """

    default_code = "ERROR"
    exit_code = EXIT_ERROR

    def __init__(self, message: str, *, hint: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.code = code or self.default_code

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def to_dict(self) -> dict[str, str | int | None]:
        """The error as a JSON-able document (used by ``--json`` error output)."""
        return {"code": self.code, "message": self.message, "hint": self.hint, "exit_code": self.exit_code}


class UsageError(MoetoolError):
    """Options that do not fit together, or a value out of range (exit code 2)."""

    default_code = "USAGE"
    exit_code = EXIT_USAGE


class SourceNotFoundError(MoetoolError):
    """The model path or repository does not exist or cannot be reached."""

    default_code = "SOURCE_NOT_FOUND"


class ConfigError(MoetoolError):
    """config.json is missing, unreadable, or holds values of the wrong type."""

    default_code = "CONFIG_INVALID"


class CheckpointError(MoetoolError):
    """A safetensors file or index is malformed, truncated, inconsistent or incomplete."""

    default_code = "CHECKPOINT_INVALID"


class UnsafePathError(CheckpointError):
    """A file name in an index (or a symlink) points outside the model folder."""

    default_code = "UNSAFE_PATH"


class PickleRefusedError(CheckpointError):
    """The checkpoint is stored as pickle (.bin/.pt/.pth/.ckpt), which moetool never loads."""

    default_code = "PICKLE_REFUSED"


class UnsupportedArchitectureError(MoetoolError):
    """The model family is not in the registry, or the command cannot handle it."""

    default_code = "UNSUPPORTED_ARCH"


class ShapeMismatchError(CheckpointError):
    """A tensor's shape disagrees with what config.json implies."""

    default_code = "SHAPE_MISMATCH"


class NonfiniteError(CheckpointError):
    """Weights hold NaN or infinite values: an input (``NONFINITE_WEIGHTS``) or an output about to be
    published (``NONFINITE_OUTPUT``)."""

    default_code = "NONFINITE_WEIGHTS"


class InputChangedError(CheckpointError):
    """An input file changed (shrank, was replaced or truncated) while moetool was reading it."""

    default_code = "INPUT_CHANGED"


class OutputError(MoetoolError):
    """The output path is unusable: it exists, overlaps the input, or is a symlink (exit code 2)."""

    default_code = "OUTPUT_INVALID"
    exit_code = EXIT_USAGE


class ThresholdFailedError(MoetoolError):
    """A ``--fail-if`` style threshold was crossed (exit code 3)."""

    default_code = "THRESHOLD_FAILED"
    exit_code = EXIT_THRESHOLD


class DatasetError(MoetoolError):
    """A dataset that cannot be used: missing, empty, malformed, or without the requested fields.

    Codes: ``DATASET_NOT_FOUND``, ``DATASET_FORMAT`` (unknown extension, malformed file),
    ``DATASET_COLUMN`` (missing or mistyped text/domain field), ``DATASET_EMPTY`` (no non-empty text),
    ``DATASET_SPLIT`` (the split does not exist).
    """

    default_code = "DATASET_INVALID"


class MissingDependencyError(MoetoolError):
    """An optional package that this input needs is not installed (the hint names the pip command)."""

    default_code = "DEPENDENCY_MISSING"


class ModelLoadError(MoetoolError):
    """transformers could not build the model or tokenizer from a checkpoint.

    Codes: ``TOKENIZER_MISSING``, ``TOKENIZER_INVALID``, ``TOKENIZER_MISMATCH`` (two models that must
    share a tokenizer do not), ``REMOTE_CODE_REFUSED``, ``MODEL_LOAD_FAILED``.
    """

    default_code = "MODEL_LOAD_FAILED"


class MoetoolWarning(UserWarning):
    """A problem moetool handled on its own and reports (a stale staging folder removed, remote code
    dropped from an output config). The CLI prints each as one ``warning:`` line on stderr; library
    users see them through Python's :mod:`warnings` machinery."""
