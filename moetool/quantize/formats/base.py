"""The interface every quantized storage format implements, and what formats share.

A format owns how a quantize run's codes land on disk and come back: the names and layout of the
stored tensors (:meth:`StorageFormat.stored`, :meth:`StorageFormat.write_layer`), the config.json
entries (:meth:`StorageFormat.config_entries`), reading a layer back into moetool's in-memory packed
weights (:meth:`StorageFormat.read_layer`), the checks after writing (:meth:`StorageFormat.verify`),
and which settings it can hold at all (:meth:`StorageFormat.unfit_reason`). Adding a format is one
module with a subclass plus its entry in :data:`moetool.quantize.formats.FORMATS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from moetool.io.checkpoint import Checkpoint
    from moetool.quantize.engine import LayerResult
    from moetool.quantize.layout import QuantLayout
    from moetool.quantize.storage import PackedWeight, QuantFormat
    from moetool.quantize.verify import Check


@dataclass(frozen=True)
class Stored:
    """One tensor a format writes in place of (part of) a quantized source tensor.

    Attributes:
        name: the stored tensor's name.
        original: the source tensor it replaces (several stored tensors may share one).
        params: the logical parameters it holds (the codes); 0 for scales, zero points and shapes.
    """

    name: str
    original: str
    params: int = 0


@dataclass
class VerifyContext:
    """What a format's checks may look at after the files are written (in the staging folder).

    The quantized model is never held whole: the weights the files must hold are known by their
    fingerprints (computed layer by layer while quantizing), and its logits on the probe window by the
    streamed pass.

    Attributes:
        folder: the staging folder.
        written: the written checkpoint, opened.
        source: the source checkpoint.
        layout / fmt: what was quantized, and how.
        digests: per decoder layer, the SHA-256 of each quantized weight as the quantizer left it in the
            compute dtype: ``{"gate_up": ..., "down": ..., "<linear module>": ...}``, experts in order
            (see :func:`moetool.quantize.api._digest`).
        want_logits: the quantized model's logits on ``sample_ids`` (from the streamed pass).
        sample_ids: the probe token ids.
        dtype: the compute dtype the quantizer held the weights in.
        full: whether reloading the whole model is allowed (it costs no more memory than quantizing).
    """

    folder: Path
    written: Checkpoint
    source: Checkpoint
    layout: QuantLayout
    fmt: QuantFormat
    digests: dict[int, dict[str, str]]
    want_logits: Any
    sample_ids: Any
    dtype: Any
    full: bool


class StorageFormat(ABC):
    """A quantized storage format (see the module docstring)."""

    #: the ``--format`` value.
    name: ClassVar[str]
    #: ``quantization_config.quant_method`` in config.json.
    quant_method: ClassVar[str]
    #: stored-tensor names transformers must not report as unexpected when moetool's own quantizer
    #: loads the checkpoint (a regular expression).
    packed_keys: ClassVar[str]

    @abstractmethod
    def unfit_reason(self, fmt: QuantFormat, layout: QuantLayout) -> str | None:
        """Why these settings cannot be stored in this format (``None``: they can)."""

    @abstractmethod
    def probe(self, spec: Any) -> Callable[[str], str]:
        """For a family: maps a quantized source tensor's name to a stored name whose presence shows it
        was quantized (how :func:`~moetool.quantize.layout.build_layout` finds what a checkpoint holds)."""

    @abstractmethod
    def stored(self, layout: QuantLayout, fmt: QuantFormat) -> list[Stored]:
        """Every tensor written in place of the quantized source tensors."""

    @abstractmethod
    def write_layer(self, writer: Any, layout: QuantLayout, layer: int, result: LayerResult, fmt: QuantFormat) -> None:
        """Add one decoder layer's quantized tensors to the shard writer."""

    @abstractmethod
    def config_entries(
        self, fmt: QuantFormat, layout: QuantLayout, model: Any, checkpoint: Checkpoint
    ) -> dict[str, Any]:
        """The config.json entries to set (``quantization_config`` and anything else the format needs)."""

    @abstractmethod
    def read_format(self, config: dict[str, Any], checkpoint: Checkpoint) -> QuantFormat:
        """The settings a written checkpoint's config.json records (validated).

        Raises:
            ConfigError: ``QUANT_CONFIG_INVALID``.
        """

    @abstractmethod
    def read_layer(
        self, checkpoint: Checkpoint, layout: QuantLayout, fmt: QuantFormat, layer: int
    ) -> dict[str, PackedWeight | tuple[PackedWeight, PackedWeight]]:
        """One layer's stored codes as moetool's in-memory packed weights: ``{"experts": (gate_up, down),
        "<linear module>": weight}``.

        Raises:
            CheckpointError: a missing or mis-shaped stored tensor.
        """

    def usage(self, fmt: QuantFormat, layout: QuantLayout) -> str:
        """How to load or serve an output in this format (for the model card)."""
        return ""

    def verify(self, ctx: VerifyContext) -> list[Check]:
        """Format-specific checks after writing (beyond coverage and the exact decode)."""
        return []
