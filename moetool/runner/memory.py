"""What running a checkpoint costs in memory, known before any work: from the safetensors headers alone
(or, less exactly, from config.json's parameter count: :func:`estimate_from_counts`).

:func:`estimate` groups the stored tensors by decoder layer (the ``layers.N.`` / ``blocks.N.`` / ``h.N.``
/ ``block.N.`` part of their names), so it needs neither torch nor the model: ``moetool inspect
--memory`` and every command's plan print it, and :func:`check_fits` refuses a run whose largest layer
and activations cannot fit before anything heavy happens.

What the layer-streamed runner holds at once: one decoder layer's weights in the compute dtype (the
largest decides), the input embedding or the output head at the ends, the small global weights, and
the activations of the batches of one pass (tokens x hidden size x a few copies), plus a fixed overhead
(the Python process, torch, the tokenizer: about 0.5 GB on the CPU). The whole-model path holds every
weight at once.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moetool.errors import MoetoolError

if TYPE_CHECKING:
    from moetool.io.checkpoint import Checkpoint

#: Bytes per element of the dtypes a model may be run in.
COMPUTE_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Bytes per element of stored safetensors dtypes (packed formats count their storage).
STORED_ITEMSIZE = {
    "F64": 8,
    "F32": 4,
    "BF16": 2,
    "F16": 2,
    "I64": 8,
    "I32": 4,
    "U32": 4,
    "I16": 2,
    "U16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
#: Hidden-state copies per token a pass holds: the kept state, a layer's input and output, and the
#: largest temporary inside a layer (the residual, attention output).
ACTIVATION_COPIES = 4
#: The process itself: Python, torch, transformers, the tokenizer and the dataset.
FIXED_OVERHEAD_BYTES = 600 * 10**6

_LAYER = re.compile(r"(?:^|\.)(?:layers|blocks|block|h)\.(\d+)\.")
_STACK = re.compile(r"(?:^|\.)(encoder|decoder)\.")


@dataclass
class MemoryEstimate:
    """Sizes that decide what a run holds (bytes, in the compute dtype unless said otherwise).

    Attributes:
        dtype: the compute dtype these figures are for.
        params: parameters (logical elements) stored.
        stored_bytes: bytes on disk.
        weights_by_dtype: the whole model's weights if loaded in float32 / bfloat16 / float16.
        layers: decoder layers found.
        largest_layer: the name of the largest decoder layer; largest_layer_bytes its weights.
        embedding_bytes / head_bytes: the input embedding and the output head.
        other_bytes: everything outside the layers, embedding and head (norms, ...).
        hidden_size: the width of an activation.
        activation_bytes_per_token: per token position of a pass.
    """

    dtype: str
    params: int
    stored_bytes: int
    weights_by_dtype: dict[str, int]
    layers: int
    largest_layer: str | None
    largest_layer_bytes: int
    embedding_bytes: int
    head_bytes: int
    other_bytes: int
    hidden_size: int
    activation_bytes_per_token: int
    notes: list[str] = field(default_factory=list)

    def activations(self, tokens: int) -> int:
        """Activation bytes of a pass over ``tokens`` positions."""
        return self.activation_bytes_per_token * tokens

    def streamed_peak(self, tokens: int) -> int:
        """What the layer-streamed runner holds at its peak for a pass over ``tokens`` positions."""
        ends = max(self.embedding_bytes, self.head_bytes)
        return self.largest_layer_bytes + ends + self.other_bytes + self.activations(tokens) + FIXED_OVERHEAD_BYTES

    def whole_peak(self, tokens: int) -> int:
        """What loading the whole model holds (weights in the compute dtype, plus one batch)."""
        return self.weights_by_dtype[self.dtype] + self.activations(tokens) + FIXED_OVERHEAD_BYTES

    def to_json(self, tokens: int | None = None) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "dtype": self.dtype,
            "params": self.params,
            "stored_bytes": self.stored_bytes,
            "weights_by_dtype": dict(self.weights_by_dtype),
            "layers": self.layers,
            "largest_layer": self.largest_layer,
            "largest_layer_bytes": self.largest_layer_bytes,
            "embedding_bytes": self.embedding_bytes,
            "head_bytes": self.head_bytes,
            "other_bytes": self.other_bytes,
            "hidden_size": self.hidden_size,
            "activation_bytes_per_token": self.activation_bytes_per_token,
            "fixed_overhead_bytes": FIXED_OVERHEAD_BYTES,
        }
        if tokens is not None:
            doc["tokens"] = tokens
            doc["activation_bytes"] = self.activations(tokens)
            doc["streamed_peak_bytes"] = self.streamed_peak(tokens)
            doc["whole_model_peak_bytes"] = self.whole_peak(tokens)
        return doc


def _numel(info: Any) -> int:
    n = 1
    for dim in info.shape:
        n *= int(dim)
    return n


def _hidden_size(config: dict[str, Any]) -> int:
    for source in (config.get("text_config"), config):
        if isinstance(source, dict):
            for key in ("hidden_size", "d_model", "n_embd", "dim"):
                value = source.get(key)
                if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                    return value
    return 0


def estimate(checkpoint: Checkpoint, dtype: str = "float32") -> MemoryEstimate:
    """Memory figures of a checkpoint run in ``dtype`` (float32, bfloat16 or float16), from its headers.

    Packed or 8-bit stored tensors (quantized checkpoints) are counted at their stored size, since
    they stay packed in memory.
    """
    itemsize = COMPUTE_ITEMSIZE.get(dtype, 4)
    per_layer: dict[str, int] = {}
    by_dtype = dict.fromkeys(COMPUTE_ITEMSIZE, 0)
    embedding = head = other = params = stored = 0
    for name, info in checkpoint.tensors.items():
        numel = _numel(info)
        stored += info.nbytes
        floating = info.dtype in ("F32", "BF16", "F16", "F64")
        params += numel
        size = numel * itemsize if floating else info.nbytes
        for compute, width in COMPUTE_ITEMSIZE.items():
            by_dtype[compute] += numel * width if floating else info.nbytes
        match = _LAYER.search(name)
        if match:
            stack = _STACK.search(name[: match.start() + 1])
            key = (f"{stack.group(1)}." if stack else "") + f"layer {match.group(1)}"
            per_layer[key] = per_layer.get(key, 0) + size
        elif "embed" in name or name.endswith(("wte.weight", "shared.weight")):
            embedding = max(embedding, size)
        elif "lm_head" in name or name.endswith("output.weight"):
            head += size
        else:
            other += size
    tied = head == 0
    largest = max(per_layer, key=per_layer.__getitem__) if per_layer else None
    notes = ["the output head shares the input embedding (tied)"] if tied and embedding else []
    hidden = _hidden_size(checkpoint.config)
    return MemoryEstimate(
        dtype=dtype,
        params=params,
        stored_bytes=stored,
        weights_by_dtype=by_dtype,
        layers=len(per_layer),
        largest_layer=largest,
        largest_layer_bytes=per_layer.get(largest, 0) if largest else 0,
        embedding_bytes=embedding,
        head_bytes=embedding if tied else head,
        other_bytes=other,
        hidden_size=hidden,
        activation_bytes_per_token=ACTIVATION_COPIES * hidden * itemsize,
        notes=notes,
    )


def estimate_from_counts(report: Any, config: dict[str, Any], dtype: str = "float32") -> MemoryEstimate:
    """Memory figures from a config-only parameter count (``inspect --config-only --memory``).

    Without headers the stored dtypes are unknown: every parameter is taken as floating point, stored in
    the config's ``torch_dtype`` / ``dtype`` (bfloat16 when it names none), so checkpoints stored in FP8 or
    packed formats take less on disk than said here (their compute-dtype figures hold). MTP modules are
    stored but never run, so they count in the weights and not in the largest layer.

    Args:
        report: a :class:`moetool.count.params.ParamReport` (from ``count_from_config``).
        config: the checkpoint's config.json.
        dtype: the compute dtype.
    """
    itemsize = COMPUTE_ITEMSIZE.get(dtype, 4)
    run_layers = [layer for layer in report.layers if layer.kind != "mtp"]
    largest = max(run_layers, key=lambda layer: layer.total, default=None)
    embedding = report.categories["embedding"].total
    head = report.categories["lm_head"].total
    stored_params = report.total_params_with_mtp
    layer_params = sum(layer.total for layer in report.layers)
    other = max(0, stored_params - layer_params - embedding - head)
    stored_dtype = None
    for source in (config.get("text_config"), config):
        if isinstance(source, dict):
            stored_dtype = stored_dtype or source.get("torch_dtype") or source.get("dtype")
    stored_width = COMPUTE_ITEMSIZE.get(str(stored_dtype), 2)
    notes = [f"from config.json: every parameter taken as {stored_dtype or 'bfloat16'} on disk"]
    if isinstance(config.get("quantization_config"), dict):
        method = config["quantization_config"].get("quant_method", "a quantization")
        notes.append(f"config.json declares {method} storage: the files are smaller than said here")
    if report.tied_embeddings and embedding:
        notes.append("the output head shares the input embedding (tied)")
    return MemoryEstimate(
        dtype=dtype,
        params=stored_params,
        stored_bytes=stored_params * stored_width,
        weights_by_dtype={name: stored_params * width for name, width in COMPUTE_ITEMSIZE.items()},
        layers=len(run_layers),
        largest_layer=f"layer {largest.index}" if largest is not None else None,
        largest_layer_bytes=largest.total * itemsize if largest is not None else 0,
        embedding_bytes=embedding * itemsize,
        head_bytes=(head or (embedding if report.tied_embeddings else 0)) * itemsize,
        other_bytes=other * itemsize,
        hidden_size=_hidden_size(config),
        activation_bytes_per_token=ACTIVATION_COPIES * _hidden_size(config) * itemsize,
        notes=notes,
    )


def available_bytes(device: Any = "cpu") -> int:
    """Memory free for new allocations on a device: ``MemAvailable`` (or free pages) for the CPU,
    ``cudaMemGetInfo``'s free bytes for a GPU."""
    kind = getattr(device, "type", str(device).split(":")[0])
    if kind == "cuda":
        import torch

        index = getattr(device, "index", None)
        free, _total = torch.cuda.mem_get_info(index if index is not None else torch.cuda.current_device())
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**40  # unknown: do not refuse


def human(n: int) -> str:
    """Bytes in decimal units."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"


class InsufficientMemoryError(MoetoolError):
    """Not even one layer and its activations fit where they would run."""

    default_code = "OUT_OF_MEMORY"


def check_fits(estimate: MemoryEstimate, *, tokens: int, device: Any, whole_model: bool = False) -> None:
    """Refuse a run that cannot fit, before any work, with the figures.

    Args:
        estimate: from :func:`estimate`.
        tokens: token positions of the smallest pass the command can run (one batch for profiling and
            evaluation, all calibration tokens for quantization).
        device: where the weights and activations go.
        whole_model: the whole-model path (all weights at once).

    Raises:
        InsufficientMemoryError: with what is needed and what is free.
    """
    need = estimate.whole_peak(tokens) if whole_model else estimate.streamed_peak(tokens)
    free = available_bytes(device)
    if need > free:
        what = "the whole model" if whole_model else f"one layer ({estimate.largest_layer})"
        raise InsufficientMemoryError(
            f"{what} and the activations of {tokens:,} tokens need about {human(need)} on {device}, "
            f"but only {human(free)} is free",
            hint="use fewer tokens per pass (--batch-size, --seq-len, --max-tokens), --dtype bfloat16, or a "
            "machine with more memory" + ("; drop --whole-model to stream the layers" if whole_model else ""),
        )
