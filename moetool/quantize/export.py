"""``export()``: a moetool-format quantized checkpoint rewritten in compressed-tensors, codes unchanged.

What servers read (vLLM, SGLang) is compressed-tensors; ``moetool quantize`` writes it directly when the
settings fit. Checkpoints quantized into moetool's own format (earlier runs, or ``--format moetool``)
convert when their codes are what compressed-tensors and the servers' MoE kernels hold: symmetric
uniform codes (no zero point), 4 or 8 bits, groups that divide every row. Nothing is re-quantized:
each weight keeps its codes and its scales (written as float32, so that the float16 scales stay
exact; a server running in bfloat16 then rounds them to bfloat16). Asymmetric codes (the default of
moetool's format), 2/3-bit, NF4 and ternary codes do not fit, and the refusal says so and what to run
instead.

The output is verified like a quantize output: every routed expert stored quantized, the
compressed-tensors library decompresses each weight to exactly what moetool's loader reconstructs
from the source, and (small models) stock transformers, or moetool's loader where transformers cannot
map the family, gives the source's logits.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from moetool.errors import CheckpointError
from moetool.io.sizes import DEFAULT_MAX_SHARD_SIZE
from moetool.progress import Progress, report
from moetool.quantize.storage import QuantFormat
from moetool.quantize.verify import CategoryStorage, Verification

#: Checkpoints up to this many bytes (packed) are also loaded whole for a logits comparison.
FULL_CHECK_BYTES = 4 * 10**9

SCHEMA_VERSION = 1


@dataclass
class ExportResult:
    """What :func:`export` did (``--json`` prints :meth:`to_json`)."""

    source: str
    output: str
    family: str
    format: QuantFormat
    quantization_config: dict[str, Any] = field(default_factory=dict)
    storage: dict[str, CategoryStorage] = field(default_factory=dict)
    verification: Verification | None = None
    timings: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0

    def to_json(self) -> dict[str, Any]:
        """The result as one JSON-able document (``schema_version`` 1)."""
        return {
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "output": self.output,
            "family": self.family,
            "format": self.format.storage,
            "quantization": self.quantization_config,
            "bits_per_param": {k: v.to_json() for k, v in self.storage.items()},
            "verification": None if self.verification is None else self.verification.to_json(),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "files": self.files,
            "bytes_written": self.bytes_written,
        }


def export_unfit_reason(fmt: QuantFormat, layout: Any) -> str | None:
    """Why a moetool-format checkpoint's codes cannot become compressed-tensors (``None``: they can)."""
    from moetool.quantize.formats import FORMATS

    if fmt.zero_point:  # asymmetric uniform codes
        return (
            f"its {fmt.bits}-bit codes are asymmetric (a zero point per group); the servers' MoE kernels and "
            "transformers' MoE loading need symmetric codes"
        )
    return FORMATS["compressed-tensors"].unfit_reason(fmt, layout)


def _digests(source: Any, storage: Any, layout: Any, fmt: QuantFormat) -> dict[int, dict[str, str]]:
    """Fingerprints of what moetool's loader reconstructs from the source, per layer (float32): the
    reference the written files must decode to. One layer's weights in memory at a time."""
    import torch
    from torch import nn

    from moetool.quantize.modules import QuantizedExperts, QuantizedLinear
    from moetool.quantize.verify import tensor_digest

    out: dict[int, dict[str, str]] = {}
    for layer in layout.layers:
        decoded = storage.read_layer(source, layout, fmt, layer)
        digests: dict[str, str] = {}
        if "experts" in decoded:
            info = layout.experts[layer]
            holder = QuantizedExperts(info.num_experts, info.hidden, info.intermediate, nn.Identity(), fmt)
            holder.load(*decoded.pop("experts"))
            gate_up, down = holder.dequantize()
            digests["gate_up"], digests["down"] = (
                tensor_digest(gate_up.to(torch.float32)),
                tensor_digest(down.to(torch.float32)),
            )
            del holder, gate_up, down
        for linear in layout.linears.get(layer, []):
            holder = QuantizedLinear(linear.shape[1], linear.shape[0], False, fmt)
            holder.load(decoded[linear.module])
            digests[linear.module] = tensor_digest(holder.dequantize().to(torch.float32))
        out[layer] = digests
    return out


def _as_quantized(weight: Any, fmt: QuantFormat) -> Any:
    """A packed weight read from the source as the engine's result type (unpacked codes)."""
    from moetool.quantize.pack import unpack_bits
    from moetool.quantize.rtn import QuantizedWeight

    codes = unpack_bits(weight.codes, weight.code_bits, weight.columns)
    return QuantizedWeight(codes, weight.scale.float(), weight.zero, codes, fmt.group_size)


def export(
    source: Any,
    out: Path | str,
    *,
    to: str = "compressed-tensors",
    verify: bool = True,
    full_check: bool | None = None,
    overwrite: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    offline: bool | None = None,
    command: str | Sequence[str] | None = None,
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE,
    progress: Progress | None = None,
) -> ExportResult:
    """Rewrite a moetool-format quantized checkpoint in compressed-tensors (the same codes and scales).

    Args:
        source: a local folder, a Hub repo id, or an opened :class:`~moetool.io.checkpoint.Checkpoint`.
        out: the output folder.
        to: the target format (``compressed-tensors``).
        verify: run the checks before publishing.
        full_check: reload the output and compare logits (``None``: when the source weighs at most 4 GB).
        overwrite: replace an existing output folder.
        revision / token / offline: Hub access for a repo id.
        command: the command line, for the model card.
        max_shard_size: largest output weight file, in bytes.
        progress: reports each step as a status line (:mod:`moetool.progress`).

    Returns:
        What was written and checked.

    Raises:
        UsageError: an unknown target format.
        CheckpointError: ``NOT_MOETOOL_FORMAT`` (not a moetool-format checkpoint), ``EXPORT_UNFIT`` (codes
            the target cannot hold, saying why), a damaged source.
        OutputError: the output path exists (without ``overwrite``), overlaps the input, ...
        VerificationError: a failed check (nothing is published).
    """
    from moetool.errors import UsageError
    from moetool.io.writer import check_output_path, staged_output
    from moetool.quantize.formats import FORMATS

    def status(message: str) -> None:
        report(progress, message)

    started = time.perf_counter()
    if to != "compressed-tensors":
        raise UsageError(
            f"cannot export to {to!r}", hint="moetool export writes compressed-tensors", code="FORMAT_INVALID"
        )
    checkpoint, spec, layout, fmt = _open_source(source, revision=revision, token=token, offline=offline)
    ct = FORMATS["compressed-tensors"]
    target = replace(fmt, storage=ct.name, scale_dtype="float32", value_dtype="float32")
    out = Path(out)
    check_output_path(out, [checkpoint.root], overwrite=overwrite)
    timings: dict[str, float] = {}
    result = ExportResult(source=checkpoint.name, output=str(out), family=spec.name, format=target)
    with staged_output(out, inputs=[checkpoint.root], overwrite=overwrite) as staging:
        step = time.perf_counter()
        _write_converted(staging, checkpoint, layout, fmt, target, result, max_shard_size, status)
        timings["write"] = time.perf_counter() - step
        step = time.perf_counter()
        result.verification = _verify_export(
            staging, out, checkpoint, layout, fmt, target, verify=verify, full_check=full_check, status=status
        )
        result.storage = result.verification.storage
        timings["verify"] = time.perf_counter() - step
        _write_card(staging, checkpoint, spec.name, layout, fmt, target, result.verification, command)
        result.files = sorted(p.name for p in staging.iterdir())
        result.bytes_written = sum(p.stat().st_size for p in staging.glob("*.safetensors"))
        status("publishing")
    timings["total"] = time.perf_counter() - started
    result.timings = timings
    return result


def _open_source(
    source: Any, *, revision: str | None, token: str | bool | None, offline: bool | None
) -> tuple[Any, Any, Any, QuantFormat]:
    """Open a moetool-format checkpoint and read its settings and layout, refusing anything else and codes
    compressed-tensors cannot hold: ``(checkpoint, family spec, layout, settings)``."""
    from moetool.arch.dims import resolve_dims
    from moetool.arch.registry import family_for_config
    from moetool.io.checkpoint import Checkpoint
    from moetool.modeling import open_checkpoint, quant_method_of
    from moetool.quantize.formats import FORMATS
    from moetool.quantize.layout import build_layout

    checkpoint = (
        source
        if isinstance(source, Checkpoint)
        else open_checkpoint(str(source), revision=revision, token=token, offline=offline)
    )
    method = quant_method_of(checkpoint.config)
    if method != "moetool":
        what = f"already {method}" if method else "not quantized"
        raise CheckpointError(
            f"{checkpoint.name} is {what}: moetool export converts moetool-format quantized checkpoints",
            hint="quantize a full-precision model with `moetool quantize --format compressed-tensors`"
            if method is None
            else "it needs no conversion",
            code="NOT_MOETOOL_FORMAT",
        )
    own = FORMATS["moetool"]
    fmt = own.read_format(checkpoint.config, checkpoint)
    spec = family_for_config(checkpoint.config)
    dims = resolve_dims(spec, checkpoint.config)
    layout = build_layout(spec, dims, checkpoint, fmt.categories, probe=own.probe(spec))
    reason = export_unfit_reason(fmt, layout)
    if reason:
        raise CheckpointError(
            f"{checkpoint.name} cannot become compressed-tensors: {reason}",
            hint="quantize the full-precision model again with `moetool quantize --format compressed-tensors` "
            "(symmetric int4/int8, groups of 32, 64, 128 or per row)",
            code="EXPORT_UNFIT",
        )
    return checkpoint, spec, layout, fmt


def _write_converted(
    staging: Path,
    checkpoint: Any,
    layout: Any,
    fmt: QuantFormat,
    target: QuantFormat,
    result: ExportResult,
    max_shard_size: int,
    status: Callable[[str], None],
) -> None:
    """Every layer's codes read from moetool's format and written in compressed-tensors, one layer at a
    time; the other tensors copied; config.json with the new ``quantization_config``."""
    from moetool.io.shards import ShardWriter
    from moetool.io.writer import copy_aux_files, write_json
    from moetool.quantize.engine import LayerReport, LayerResult
    from moetool.quantize.formats import FORMATS
    from moetool.quantize.formats.moetool_format import GUARD_KEY

    own, ct = FORMATS["moetool"], FORMATS["compressed-tensors"]
    own_stored = {s.name for s in own.stored(layout, fmt)}
    with ShardWriter(staging, max_shard_size=max_shard_size) as writer:
        for layer in layout.layers:
            status(f"converting layer {layer}")
            decoded = own.read_layer(checkpoint, layout, fmt, layer)
            layer_result = LayerResult(LayerReport(layer))
            if "experts" in decoded:
                gate_up, down = decoded.pop("experts")
                layer_result.experts = (_as_quantized(gate_up, fmt), _as_quantized(down, fmt))
            layer_result.linears = {name: _as_quantized(w, fmt) for name, w in decoded.items()}
            ct.write_layer(writer, layout, layer, layer_result, target)
        status("copying the other tensors")
        keep = [name for name in checkpoint.tensors if name not in own_stored]
        for name, tensor in checkpoint.iter_tensors(keep):
            writer.add(name, tensor)
    config = {k: v for k, v in checkpoint.config.items() if k != GUARD_KEY}
    config.update(ct.config_entries(target, layout, None, checkpoint))
    result.quantization_config = config["quantization_config"]
    write_json(staging / "config.json", config)
    copy_aux_files(checkpoint.root, staging)


def _verify_export(
    staging: Path,
    out: Path,
    checkpoint: Any,
    layout: Any,
    fmt: QuantFormat,
    target: QuantFormat,
    *,
    verify: bool,
    full_check: bool | None,
    status: Callable[[str], None],
) -> Verification:
    """Coverage, then (``verify``) compressed-tensors' checks against what moetool's loader reconstructs
    from the source (and its logits, for a source of at most :data:`FULL_CHECK_BYTES` or ``full_check``)."""
    from moetool.io.checkpoint import Checkpoint
    from moetool.quantize.formats import FORMATS, VerifyContext
    from moetool.quantize.verify import check_coverage, measure_storage

    ct = FORMATS["compressed-tensors"]
    written = Checkpoint.open(staging, name=str(out))
    stored = ct.stored(layout, target)
    verification = Verification(storage=measure_storage(written, checkpoint, layout, stored))
    verification.checks.append(check_coverage(written, checkpoint, layout, stored))
    if not verify:
        return verification
    import torch

    full = full_check if full_check is not None else checkpoint.total_bytes() <= FULL_CHECK_BYTES
    want = sample_ids = None
    if full:
        from moetool.modeling import load_weights

        status(f"loading {checkpoint.name} with moetool's loader")
        model = load_weights(checkpoint, device="cpu", dtype="float32")
        vocab = int(model.get_input_embeddings().weight.shape[0])
        sample_ids = torch.randint(0, vocab, (1, 32), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            want = model(input_ids=sample_ids, use_cache=False).logits.float()
        del model
    status("verifying the written codes")
    context = VerifyContext(
        folder=staging,
        written=written,
        source=checkpoint,
        layout=layout,
        fmt=target,
        digests=_digests(checkpoint, FORMATS["moetool"], layout, fmt),
        want_logits=want,
        sample_ids=sample_ids,
        dtype=torch.float32,
        full=full,
    )
    verification.checks += ct.verify(context)
    return verification


def _write_card(
    staging: Path,
    checkpoint: Any,
    family: str,
    layout: Any,
    fmt: QuantFormat,
    target: QuantFormat,
    verification: Verification,
    command: str | Sequence[str] | None,
) -> None:
    from moetool.io.model_card import write_model_card
    from moetool.quantize.formats import FORMATS

    ct = FORMATS["compressed-tensors"]
    write_model_card(
        staging,
        base_models=[checkpoint.name],
        relation="quantized",
        command=command if command is not None else "moetool export (library call)",
        options={"format": ct.name, "bits": target.bits, "group size": target.group_size, "symmetric": True},
        revision=checkpoint.revision,
        tags=("quantized", "compressed-tensors"),
        summary=(
            f"{checkpoint.name} ({family}, quantized by moetool: {fmt.label}) rewritten by moetool export in "
            f"the compressed-tensors format with the same codes and scales. {ct.usage(target, layout)}"
        ),
        results={f"check {c.name}": c.detail for c in verification.checks},
    )
