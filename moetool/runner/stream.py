"""A checkpoint run one decoder layer at a time: the runner every model-running command uses.

:class:`StreamedModel` holds a weightless skeleton of the checkpoint's transformers model and a
:class:`~moetool.runner.skeleton.WeightPlan`. A pass (:meth:`StreamedModel.run`) takes a list of batches:

1. the input embedding and the small global weights (final norm, ...) are read, every batch is embedded,
   and the embedding is freed;
2. for each decoder layer: its weights are read from the safetensors files (lazily, only that layer's
   tensors) onto the compute device, the layer runs over every batch (the consumer may run it several
   times and change it in between), and its weights are freed before the next layer is read;
3. with ``logits=True``, the output head is read last and the logits come one batch at a time.

So each weight is read once per pass, and memory holds one layer's weights plus the activations of the
batches (kept on the compute device, or in CPU memory with ``hidden="cpu"``), whatever the model size.
When the activations of all batches would not fit, :meth:`StreamedModel.segments` splits the batches
into passes (each reads the weights again).

``whole_model=True`` loads the model whole with ``from_pretrained`` instead and runs the same layer-major
schedule over it: the path the streamed one is compared against.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from moetool.runner.schedule import HEAD, BatchInput, LayerSchedule
from moetool.runner.skeleton import EMBED, GLOBALS

if TYPE_CHECKING:
    import torch

    from moetool.io.checkpoint import Checkpoint

#: ``hidden`` placements: where activations live between layers.
HIDDEN_PLACES = ("auto", "device", "cpu")


@dataclass(frozen=True)
class StreamOptions:
    """How to run a checkpoint.

    Attributes:
        device: ``auto`` (CUDA when available, else CPU), ``cpu``, ``cuda[:N]``, ``mps``.
        dtype: ``auto`` (float32 on the CPU, the checkpoint's dtype on an accelerator), or a dtype name.
        hidden: where activations live between layers: ``device`` (fastest), ``cpu`` (offloaded: GPU
            memory holds one layer and one batch), or ``auto`` (the device when they fit there).
        whole_model: load the whole model (transformers ``from_pretrained``) instead of streaming it.
    """

    device: str = "auto"
    dtype: str = "auto"
    hidden: str = "auto"
    whole_model: bool = False


class StreamedModel:
    """A checkpoint, runnable one decoder layer at a time.

    Args:
        checkpoint: an opened local checkpoint (with safetensors weights).
        options: device, dtype, activation placement, whole-model mode.

    Attributes:
        model: the transformers model (a skeleton whose weights come and go, or the whole model).
        config: its transformers config.
        device: the compute device; dtype: the compute dtype; hidden_device: where activations live.
        plan: which tensors make each piece (``None`` with ``whole_model``).

    Raises:
        UsageError: a bad device or dtype.
        UnsupportedArchitectureError / ModelLoadError / CheckpointError: the model cannot be built, or its
            tensors do not match the config.
    """

    def __init__(
        self, checkpoint: Checkpoint, options: StreamOptions | None = None, *, segment_tokens: int | None = None
    ) -> None:
        import torch

        from moetool.modeling import check_dtype_name, load_weights, resolve_device, resolve_dtype
        from moetool.runner.heap import bound_heap
        from moetool.runner.skeleton import WeightPlan, build_skeleton

        bound_heap()  # resident memory follows what is held, layer after layer
        options = options or StreamOptions()
        self.checkpoint = checkpoint
        self.options = options
        self.device = resolve_device(options.device)
        dtype = resolve_dtype(options.dtype, self.device)
        if dtype == "auto":
            dtype = _checkpoint_dtype(checkpoint)
        self.dtype: torch.dtype = dtype
        check_dtype_name(options.dtype)
        if options.hidden not in HIDDEN_PLACES:
            from moetool.errors import UsageError

            raise UsageError(f"unknown hidden-state placement {options.hidden!r}", hint="use auto, device or cpu")
        self.hidden_device = torch.device("cpu") if options.hidden == "cpu" else self.device
        if options.whole_model:
            self.model = load_weights(checkpoint, device=str(self.device), dtype=_dtype_name(self.dtype))
            self.plan = None
            from moetool.runner.skeleton import decoder_layer_paths

            self.layer_paths = decoder_layer_paths(self.model)
            self.hidden_device = self.device
        else:
            self.model = build_skeleton(checkpoint, self.dtype)
            self.plan = WeightPlan(self.model, checkpoint, self.dtype)
            self.layer_paths = self.plan.layer_paths
        self.config = self.model.config
        self.is_encoder_decoder = bool(getattr(self.config, "is_encoder_decoder", False))
        #: The most token positions one pass holds activations for (more batches: several passes).
        self.segment_tokens = segment_tokens or default_segment_tokens(
            self.hidden_size(), self.dtype, self.hidden_device
        )

    # ------------------------------------------------------------------ sizes

    def layer_bytes(self, path: str) -> int:
        """Bytes of one layer's weights in the compute dtype."""
        if self.plan is None:
            return 0
        piece = self.plan.layer_piece(path)
        itemsize = _itemsize(self.dtype)
        return sum(self.checkpoint.tensors[n].numel * itemsize for n in piece.sources)

    def hidden_size(self) -> int:
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        for attr in ("hidden_size", "d_model", "n_embd"):
            value = getattr(text, attr, None)
            if isinstance(value, int):
                return value
        return int(self.model.get_input_embeddings().embedding_dim)

    # ------------------------------------------------------------------ passes

    def batch_inputs(self, batches: Sequence[Any]) -> list[BatchInput]:
        """Model inputs for :class:`moetool.data.Batch` objects (tensors on the activation device).

        Raises:
            ModelLoadError: ``TOKENIZER_MISMATCH`` for a token id the model has no embedding for.
        """
        out = []
        vocab = int(self.model.get_input_embeddings().weight.shape[0])
        for batch in batches:
            check_token_ids(batch.input_ids, vocab, self.checkpoint.name)
            ids = batch.input_ids.to(self.hidden_device)
            mask = batch.attention_mask.to(self.hidden_device)
            kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
            if self.is_encoder_decoder:
                kwargs["decoder_input_ids"] = ids
                kwargs["decoder_attention_mask"] = mask
            out.append(BatchInput(kwargs, batch.attention_mask.reshape(-1).bool(), int(batch.attention_mask.sum())))
        return out

    def run(self, batches: Sequence[Any], *, logits: bool = False) -> LayerSchedule:
        """A layer-major pass over ``batches`` (:class:`moetool.data.Batch` objects).

        Use it as a context manager: iterate :meth:`LayerSchedule.steps` (one :class:`LayerStep` per
        decoder layer, weights loaded), then, with ``logits=True``, :meth:`LayerSchedule.logits`.
        """
        inputs = self.batch_inputs(batches)
        if self.plan is None:
            return LayerSchedule(
                self.model,
                self.layer_paths,
                inputs,
                compute_device=self.device,
                hidden_device=self.hidden_device,
                load=_nothing,
                release=_nothing,
                keep_logits=logits,
            )
        plan = self.plan
        plan.load(plan.pieces[GLOBALS], self.hidden_device)
        plan.load(plan.pieces[EMBED], self.hidden_device)
        embed_loaded = [True]
        # An encoder-decoder embeds twice (encoder, then decoder input): its embedding stays loaded.
        keep_embed = self.is_encoder_decoder

        def load(key: str) -> None:
            if embed_loaded[0] and not keep_embed:
                plan.release(plan.pieces[EMBED])
                embed_loaded[0] = False
            if key == HEAD:
                plan.load(plan.pieces["head"], self.device)
            else:
                plan.load(plan.layer_piece(key), self.device)

        def release(key: str) -> None:
            plan.release(plan.pieces["head"] if key == HEAD else plan.layer_piece(key))

        schedule = LayerSchedule(
            self.model,
            self.layer_paths,
            inputs,
            compute_device=self.device,
            hidden_device=self.hidden_device,
            load=load,
            release=release,
            keep_logits=logits,
        )
        original_close = schedule.close

        def close() -> None:
            try:
                original_close()
            finally:
                plan.release(plan.pieces[EMBED])
                plan.release(plan.pieces[GLOBALS])

        schedule.close = close  # type: ignore[method-assign]
        return schedule

    # ------------------------------------------------------------------ the runner protocol

    def forward_batches(
        self,
        batches: Iterable[Any],
        *,
        before_batch: Callable[[int, Any], None] | None = None,
        on_tokens: Callable[[float], None] | None = None,
        after_segment: Callable[[], None] | None = None,
    ) -> None:
        """Run batches through every layer, for observers hooked on the model (routers, MLP inputs).

        Batches are grouped into segments whose activations fit (:attr:`segment_tokens`); each segment is
        one layer-major pass. ``before_batch(index, batch)`` runs before each batch enters each layer
        (so once per layer); ``on_tokens`` receives progress in tokens (a batch's tokens spread over the
        layers); ``after_segment`` runs when a segment's batches have left the last layer.
        """
        for offset, segment in self._segments(batches):
            inputs = self.batch_inputs(segment)
            layers = max(1, len(self.layer_paths))
            with self.run(segment) as schedule:
                for step in schedule.steps():

                    def before(index: int, _segment: list[Any] = segment, _offset: int = offset) -> None:
                        if before_batch is not None:
                            before_batch(_offset + index, _segment[index])

                    step.run(keep=True, before_batch=before)
                    if on_tokens is not None:
                        on_tokens(sum(i.tokens for i in inputs) / layers)
            if after_segment is not None:
                after_segment()

    def logits_batches(
        self, batches: Iterable[Any], *, on_tokens: Callable[[float], None] | None = None
    ) -> Iterator[tuple[int, Any, Any]]:
        """``(index, batch, logits [B, S, vocab])`` for each batch, one batch's logits at a time."""
        for offset, segment in self._segments(batches):
            inputs = self.batch_inputs(segment)
            layers = max(1, len(self.layer_paths))
            with self.run(segment, logits=True) as schedule:
                for step in schedule.steps():
                    step.run(keep=True)
                    if on_tokens is not None:
                        on_tokens(sum(i.tokens for i in inputs) / layers)
                for index, logits in schedule.logits():
                    yield offset + index, segment[index], logits

    def _segments(self, batches: Iterable[Any]) -> Iterator[tuple[int, list[Any]]]:
        offset = 0
        for segment in iter_segments(batches, self.segment_tokens):
            yield offset, segment
            offset += len(segment)

    def close(self) -> None:
        """Free the model (the skeleton holds no weights between passes)."""
        self.model = None
        self.plan = None


def check_token_ids(input_ids: Any, vocab: int, name: str) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer of another model).

    Raises:
        ModelLoadError: ``TOKENIZER_MISMATCH``.
    """
    from moetool.errors import ModelLoadError

    largest = int(input_ids.max()) if input_ids.numel() else -1
    if largest >= vocab or (input_ids.numel() and int(input_ids.min()) < 0):
        raise ModelLoadError(
            f"the tokenizer produced token id {largest}, but {name} has only {vocab} embeddings",
            hint="the tokenizer files do not belong to this model",
            code="TOKENIZER_MISMATCH",
        )


def default_segment_tokens(hidden: int, dtype: Any, device: Any) -> int:
    """How many token positions one pass may hold: a quarter of the free memory where activations live,
    at about four hidden-state copies per position (the kept state, a layer's input, output and the
    residual inside it), never below one window's worth of a typical batch."""
    from moetool.runner.memory import available_bytes

    per_token = 4 * hidden * _itemsize(dtype)
    return max(8192, available_bytes(device) // 4 // max(1, per_token))


def _nothing(_key: str) -> None:
    return None


def _itemsize(dtype: Any) -> int:
    import torch

    return torch.empty((), dtype=dtype).element_size()


def _dtype_name(dtype: Any) -> str:
    return str(dtype).removeprefix("torch.")


def _checkpoint_dtype(checkpoint: Checkpoint) -> Any:
    """The floating dtype most of the checkpoint's bytes are stored in (``auto`` on an accelerator)."""
    import torch

    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    counts: dict[Any, int] = {}
    for info in checkpoint.tensors.values():
        if info.dtype in names:
            counts[names[info.dtype]] = counts.get(names[info.dtype], 0) + info.nbytes
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def iter_segments(batches: Iterator[Any] | Sequence[Any], max_tokens: int) -> Iterator[list[Any]]:
    """Group batches into segments of at most ``max_tokens`` positions (at least one batch each)."""
    segment: list[Any] = []
    size = 0
    for batch in batches:
        positions = int(batch.input_ids.numel())
        if segment and size + positions > max_tokens:
            yield segment
            segment, size = [], 0
        segment.append(batch)
        size += positions
    if segment:
        yield segment


class WholeModel:
    """A model already in memory, run batch by batch (the whole-model path).

    The same protocol as :class:`StreamedModel` (``model``, ``device``, :meth:`forward_batches`,
    :meth:`logits_batches`), so a command runs either without knowing which.

    Args:
        model: a transformers model in eval mode (e.g. from :func:`moetool.modeling.load_weights`).
    """

    def __init__(self, model: Any) -> None:
        from moetool.modeling import model_device

        self.model = model
        self.config = model.config
        self.device = model_device(model)
        self.name = str(getattr(model, "name_or_path", "") or type(model).__name__)
        self.is_encoder_decoder = bool(getattr(self.config, "is_encoder_decoder", False))

    def _kwargs(self, batch: Any) -> dict[str, Any]:
        check_token_ids(batch.input_ids, int(self.model.get_input_embeddings().weight.shape[0]), self.name)
        ids = batch.input_ids.to(self.device)
        mask = batch.attention_mask.to(self.device)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        if self.is_encoder_decoder:
            kwargs["decoder_input_ids"] = ids
            kwargs["decoder_attention_mask"] = mask
        return kwargs

    def forward_batches(
        self,
        batches: Iterable[Any],
        *,
        before_batch: Callable[[int, Any], None] | None = None,
        on_tokens: Callable[[float], None] | None = None,
        after_segment: Callable[[], None] | None = None,
    ) -> None:
        """Run each batch through the whole model (observers hooked on the model see every layer); each
        batch is a segment of its own."""
        import torch

        with torch.inference_mode():
            for index, batch in enumerate(batches):
                if before_batch is not None:
                    before_batch(index, batch)
                self.model(**self._kwargs(batch))
                if on_tokens is not None:
                    on_tokens(int(batch.attention_mask.sum()))
                if after_segment is not None:
                    after_segment()

    def logits_batches(
        self, batches: Iterable[Any], *, on_tokens: Callable[[float], None] | None = None
    ) -> Iterator[tuple[int, Any, Any]]:
        """``(index, batch, logits [B, S, vocab])`` for each batch."""
        import torch

        for index, batch in enumerate(batches):
            with torch.inference_mode():
                output = self.model(**self._kwargs(batch))
            logits = output.logits
            del output
            if on_tokens is not None:
                on_tokens(int(batch.attention_mask.sum()))
            yield index, batch, logits
