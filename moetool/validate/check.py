"""What commands run: :func:`check_input` (and :func:`preflight`, before anything heavy)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

from moetool.errors import MoetoolWarning, NonfiniteError
from moetool.validate.findings import Validation, as_error
from moetool.validate.tensors import validate_checkpoint
from moetool.validate.transformers_config import check_transformers_config

_WARNED: set[tuple[str, str]] = set()


def _warn_once(name: str, message: str) -> None:
    if (name, message) not in _WARNED:
        _WARNED.add((name, message))
        warnings.warn(message, MoetoolWarning, stacklevel=3)


def check_input(
    checkpoint: Any,
    *,
    float_weights: bool = False,
    scan_nonfinite: bool = True,
    allow_nonfinite: bool = False,
    transformers_config: bool = True,
    on_bytes: Callable[[int], None] | None = None,
) -> Validation:
    """Refuse an input that is not what its config says, before any compute (what every command runs).

    Args:
        checkpoint: the opened input checkpoint.
        float_weights: refuse quantized storage (commands that rewrite weights: merge, quantize, upcycle).
        scan_nonfinite: read every float tensor and count NaN/Inf (commands that write a model).
        allow_nonfinite: report NaN/Inf as a warning instead of refusing.
        transformers_config: also build the config with transformers' own class
            (:func:`transformers_config_findings`; imports transformers).
        on_bytes: progress callback of the value scan, bytes read.

    Returns:
        The warnings, and the NaN/Inf found (only with ``allow_nonfinite``).

    Raises:
        ConfigError: a config field of the wrong type or value (``CONFIG_INVALID``, ``TOPK_INVALID``).
        ShapeMismatchError: a tensor shape the config does not imply (``SHAPE_MISMATCH``).
        CheckpointError: ``EXPERT_MISSING``, ``TENSOR_MISSING``, ``QUANTIZED_INPUT``.
        NonfiniteError: ``NONFINITE_WEIGHTS`` without ``allow_nonfinite``.
        InputChangedError: a shard changed while it was being scanned.
    """
    findings = validate_checkpoint(checkpoint, float_weights=float_weights)
    error = as_error(findings, checkpoint.name)
    if error is not None:
        raise error
    if transformers_config:
        check_transformers_config(checkpoint)
    for finding in findings:
        _warn_once(checkpoint.name, finding.message)
    result = Validation(findings=findings)
    if scan_nonfinite and checkpoint.root is not None and checkpoint.tensors:
        from moetool.io.nonfinite import describe, scan_checkpoint

        found = scan_checkpoint(checkpoint, on_bytes=on_bytes)
        result.nonfinite = found
        if found and not allow_nonfinite:
            raise NonfiniteError(
                f"{checkpoint.name}: {describe(found)}",
                hint="the weights are corrupt (moetool inspect --scan-nonfinite lists them); pass "
                "--allow-nonfinite to process them anyway",
                code="NONFINITE_WEIGHTS",
            )
        if found:
            _warn_once(checkpoint.name, f"{describe(found)} (processed anyway: --allow-nonfinite)")
    return result


def preflight(
    model: str,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    offline: bool | None = None,
    float_weights: bool = False,
) -> Validation:
    """What a command runs first: open ``MODEL`` from its headers and refuse it if it is malformed.

    Reads config.json and the safetensors headers only (a Hub repo: remotely, nothing downloaded),
    imports no torch, and raises the same errors as :func:`check_input` (without the value scan),
    so a bad input is refused in well under a second, before datasets are read or models loaded.

    Args:
        model: a local folder or a Hub repo id.
        revision / token / offline: Hub access.
        float_weights: see :func:`check_input`.

    Returns:
        The warnings.
    """
    from moetool.io.source import open_model

    checkpoint = open_model(model, revision=revision, token=token, offline=offline, need_weights=False)
    return check_input(checkpoint, float_weights=float_weights, scan_nonfinite=False, transformers_config=False)
