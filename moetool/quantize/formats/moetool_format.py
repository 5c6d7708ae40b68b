"""moetool's own storage format (``quant_method: "moetool"``): what no standard format holds.

Ternary codes entropy-coded below one bit, 2- and 3-bit codes, asymmetric codes with packed zero
points, NF4, and groups that do not divide a row (see :mod:`moetool.quantize.storage` for the tensor
layout). Servers cannot read it; moetool's loader (:func:`moetool.load_model`, or transformers'
``from_pretrained`` after ``import moetool.quantize``) can.

Stock transformers must never load it with random experts: it does not know the ``moetool`` quant
method, warns, and loads the rest of the model. config.json therefore also carries a
``transformers_weights`` entry (the field that tells transformers which weights file to read) that is
not a safetensors file name but a sentence naming the loader: transformers 5 then refuses the folder
at once, whatever ``from_pretrained``'s arguments, with a ``ValueError`` quoting that sentence. moetool's
quantizer removes the entry before transformers resolves the files (``update_attn_implementation``
runs first), and moetool's own loader passes a config without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from moetool.errors import CheckpointError
from moetool.quantize.formats.base import StorageFormat, Stored, VerifyContext
from moetool.quantize.storage import (
    CODES,
    QUANT_METHOD,
    SCALE,
    ZERO,
    QuantFormat,
    concat_rows,
    decode_weight,
    encode_weight,
    packed_names,
    stack_experts,
)

if TYPE_CHECKING:
    from moetool.io.checkpoint import Checkpoint
    from moetool.quantize.engine import LayerResult
    from moetool.quantize.layout import QuantLayout
    from moetool.quantize.verify import Check

#: The ``transformers_weights`` value of a moetool-format checkpoint: the message stock transformers
#: raises with (it is deliberately not a safetensors file name).
TRANSFORMERS_GUARD = (
    "(moetool-quantized checkpoint: stock transformers cannot read its experts; load it with "
    "moetool.load_model(path), or import moetool.quantize before from_pretrained)"
)
GUARD_KEY = "transformers_weights"


def strip_guard(config: Any) -> Any:
    """Remove the ``transformers_weights`` guard from a config object or dict (returned for chaining)."""
    if isinstance(config, dict):
        if config.get(GUARD_KEY) == TRANSFORMERS_GUARD:
            del config[GUARD_KEY]
    elif getattr(config, GUARD_KEY, None) == TRANSFORMERS_GUARD:
        setattr(config, GUARD_KEY, None)
    return config


class MoetoolFormat(StorageFormat):
    """``quant_method: "moetool"``: packed uint8 codes, float16 scales, packed zero points, entropy-coded
    ternary streams, under the source's own tensor names (``X.qweight``, ``X.qscale``, ``X.qzero``)."""

    name = QUANT_METHOD
    quant_method = QUANT_METHOD
    packed_keys = r"\.q(weight|scale|zero)$"

    def unfit_reason(self, fmt: QuantFormat, layout: QuantLayout) -> str | None:
        return None  # every scheme moetool quantizes to

    def probe(self, spec: Any) -> Callable[[str], str]:
        return lambda name: packed_names(name)[CODES]

    def stored(self, layout: QuantLayout, fmt: QuantFormat) -> list[Stored]:
        out: list[Stored] = []
        numel = layout.numel()
        for original in sorted(layout.quantized_names()):
            names = packed_names(original)
            out.append(Stored(names[CODES], original, numel[original]))
            out.append(Stored(names[SCALE], original))
            if fmt.zero_point:
                out.append(Stored(names[ZERO], original))
        return out

    def write_layer(self, writer: Any, layout: QuantLayout, layer: int, result: LayerResult, fmt: QuantFormat) -> None:
        def put(name: str, weight: Any) -> None:
            stored = packed_names(name)
            for suffix, tensor in encode_weight(weight, fmt).items():
                writer.add(stored[suffix], tensor)

        info = layout.experts.get(layer)
        if info is not None and result.experts is not None:
            gate_up, down = result.experts
            if info.fused:
                put(info.gate_up or "", gate_up)
                put(info.down_fused or "", down)
            else:
                i = info.intermediate
                for e in range(info.num_experts):
                    put(info.gate[e], gate_up.select(e, slice(0, i)))
                    put(info.up[e], gate_up.select(e, slice(i, 2 * i)))
                    put(info.down[e], down.select(e))
        for linear in layout.linears.get(layer, []):
            put(linear.name, result.linears[linear.module])

    def config_entries(
        self, fmt: QuantFormat, layout: QuantLayout, model: Any, checkpoint: Checkpoint
    ) -> dict[str, Any]:
        return {"quantization_config": fmt.to_config(), GUARD_KEY: TRANSFORMERS_GUARD}

    def usage(self, fmt: QuantFormat, layout: QuantLayout) -> str:
        return (
            "It is in moetool's own format (no server reads it): load it with `moetool.load_model(path)`, or "
            "`import moetool.quantize` before transformers' `AutoModelForCausalLM.from_pretrained(path)`; the "
            "experts dequantize on the fly. Without that import transformers refuses the folder."
        )

    def read_format(self, config: dict[str, Any], checkpoint: Checkpoint) -> QuantFormat:
        return QuantFormat.from_config(config.get("quantization_config") or {}, where=f"{checkpoint.name}/config.json")

    def read_layer(self, checkpoint: Checkpoint, layout: QuantLayout, fmt: QuantFormat, layer: int) -> dict[str, Any]:
        names: list[str] = []
        experts = layout.experts.get(layer)
        linears = layout.linears.get(layer, [])
        for original in (experts.names() if experts else []) + [lin.name for lin in linears]:
            packed = packed_names(original)
            names += [packed[s] for s in packed if packed[s] in checkpoint.tensors]
        tensors = dict(checkpoint.iter_tensors(names))

        def decode(original: str, shape: tuple[int, ...]) -> Any:
            packed = packed_names(original)

            def read(suffix: str) -> Any:
                name = packed[suffix]
                if name not in tensors:
                    raise CheckpointError(
                        f"{checkpoint.name} lacks {name}",
                        hint="the checkpoint does not match its quantization_config; re-create it",
                        code="QUANT_SHAPE_MISMATCH",
                    )
                return tensors[name]

            return decode_weight(read, fmt, shape, original)

        out: dict[str, Any] = {}
        if experts is not None:
            e, i, h = experts.num_experts, experts.intermediate, experts.hidden
            if experts.fused:
                gate_up = decode(experts.gate_up or "", (e, 2 * i, h))
                down = decode(experts.down_fused or "", (e, h, i))
            else:
                gates = [decode(n, (i, h)) for n in experts.gate]
                ups = [decode(n, (i, h)) for n in experts.up]
                gate_up = stack_experts([concat_rows([g, u]) for g, u in zip(gates, ups, strict=True)])
                down = stack_experts([decode(n, (h, i)) for n in experts.down])
            out["experts"] = (gate_up, down)
        for linear in linears:
            out[linear.module] = decode(linear.name, linear.shape)
        return out

    def verify(self, ctx: VerifyContext) -> list[Check]:
        from moetool.quantize.verify import Check, check_reload

        if not ctx.full:
            return [Check("reload", None, "skipped: the model is larger than the whole-model reload allows")]
        return [check_reload(ctx.folder, ctx.want_logits, ctx.sample_ids, ctx.dtype)]
