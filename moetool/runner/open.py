"""Open a checkpoint for running: layer-streamed by default, or whole (``--whole-model``).

The one place a model-running command turns ``MODEL`` and its device options into a runner and a
tokenizer, so every command streams the same way and falls back the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moetool.runner.stream import StreamedModel, StreamOptions, WholeModel

if TYPE_CHECKING:
    from moetool.io.checkpoint import Checkpoint


@dataclass
class OpenedRunner:
    """A runner (streamed or whole), its tokenizer and checkpoint, and notes for the command's plan."""

    runner: StreamedModel | WholeModel
    tokenizer: Any
    checkpoint: Checkpoint
    streamed: bool
    notes: list[str] = field(default_factory=list)

    @property
    def model(self) -> Any:
        return self.runner.model


def streaming_blocker(checkpoint: Checkpoint) -> str | None:
    """Why a checkpoint cannot be streamed (and loads whole instead), or ``None``.

    Quantized checkpoints load through their quantizer's own ``from_pretrained`` path, which replaces
    modules and decodes packed tensors for the whole model at once; they are a fraction of the
    full-precision size.
    """
    if "quantization_config" in checkpoint.config:
        return "quantized checkpoints load whole (their quantizer decodes the model at once)"
    return None


def open_runner(
    spec: str | Checkpoint,
    *,
    device: str = "auto",
    dtype: str = "auto",
    whole_model: bool = False,
    device_map: str | None = None,
    hidden: str = "auto",
    revision: str | None = None,
    token: str | bool | None = None,
    offline: bool | None = None,
    tokenizer: bool = True,
    pass_tokens: int | None = None,
) -> OpenedRunner:
    """Open ``MODEL`` for running, streamed one layer at a time unless asked (or forced) otherwise.

    Args:
        spec: what the user typed as ``MODEL``, or an opened checkpoint.
        device / dtype: see :func:`moetool.modeling.resolve_device` / :func:`moetool.modeling.resolve_dtype`.
        whole_model: load the whole model (batch-by-batch forward) instead of streaming it.
        device_map: an accelerate placement (``auto``) for the whole-model path; implies it.
        hidden: where activations live between streamed layers (``auto``, ``device``, ``cpu``).
        revision / token / offline: Hub access for a repo id.
        tokenizer: load the tokenizer (before the weights, so a missing one is reported first).
        pass_tokens: the token positions of the smallest pass the command runs (one batch): refuse, before
            any weight is read, when one layer and those activations cannot fit.

    Raises:
        UsageError, ModelLoadError, UnsupportedArchitectureError, CheckpointError: as
        :func:`moetool.modeling.load_model`.
        InsufficientMemoryError: with ``pass_tokens``, when not even one layer and its activations fit.
    """
    from moetool.io.checkpoint import Checkpoint
    from moetool.modeling import (
        check_device_map,
        check_device_name,
        check_dtype_name,
        load_tokenizer,
        load_weights,
        open_checkpoint,
    )

    check_device_name(device)
    check_dtype_name(dtype)
    device_map = check_device_map(device_map)
    if isinstance(spec, Checkpoint):
        checkpoint = spec
    else:
        checkpoint = open_checkpoint(spec, revision=revision, token=token, offline=offline)
    loaded_tokenizer = load_tokenizer(checkpoint) if tokenizer else None
    notes: list[str] = []
    blocker = streaming_blocker(checkpoint)
    if not whole_model and device_map is None and blocker is not None:
        notes.append(blocker)
        whole_model = True
    if pass_tokens is not None and device_map is None:
        from moetool.modeling import resolve_device, resolve_dtype
        from moetool.runner.memory import check_fits, estimate

        target = resolve_device(device)
        resolved = resolve_dtype(dtype, target)
        name = str(resolved).removeprefix("torch.") if resolved != "auto" else "bfloat16"
        check_fits(estimate(checkpoint, name), tokens=pass_tokens, device=target, whole_model=whole_model)
    if whole_model or device_map is not None:
        model = load_weights(checkpoint, device=device, dtype=dtype, device_map=device_map)
        return OpenedRunner(WholeModel(model), loaded_tokenizer, checkpoint, streamed=False, notes=notes)
    runner = StreamedModel(checkpoint, StreamOptions(device=device, dtype=dtype, hidden=hidden))
    return OpenedRunner(runner, loaded_tokenizer, checkpoint, streamed=True, notes=notes)
