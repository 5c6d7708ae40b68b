"""The compressed-tensors "pack-quantized" format (``quant_method: "compressed-tensors"``).

What llm-compressor writes and what vLLM's and SGLang's MoE kernels serve: int4 or int8 codes packed
into int32 (:mod:`~moetool.quantize.formats.ct_pack`), one scale per group of input columns (or per
output row) in the model's dtype, no zero point when symmetric. Each quantized weight ``X.weight``
becomes

* ``X.weight_packed``: int32 ``[rows, ceil(columns * bits / 32)]``;
* ``X.weight_scale``: ``[rows, groups]`` (``[rows, 1]`` per channel), in the checkpoint's dtype;
* ``X.weight_shape``: int64 ``[rows, columns]``;
* ``X.weight_zero_point``: asymmetric only, int32 ``[ceil(rows * bits / 32), groups]`` (packed along
  the rows).

Weights are ``(q - z) * s`` computed in the scale's dtype (that is how compressed-tensors, and so
transformers, dequantize); moetool's grid rounds its values the same way, so what GPTQ optimised is
what every reader reconstructs.

Names: routed experts are written per expert under the names the servers' MoE weight loaders map,
which for families stored per expert are the checkpoint's own (Mixtral
``block_sparse_moe.experts.{e}.w1.weight_packed``, Qwen/DeepSeek ``mlp.experts.{e}.gate_proj.weight_packed``).
Families whose experts are fused on disk (GraniteMoE ``input_linear [E, 2I, H]``) have no quantized
fused name that vLLM maps (its fused mapping loads only unquantized ``weight`` tensors), so their
experts are written per expert under the experts module with vLLM's default checkpoint names:
``{layer}.{experts module}.{e}.gate_proj|up_proj|down_proj.weight_packed``. transformers 5 maps no
quantized per-expert names onto those families' fused experts either: such outputs load with
:func:`moetool.load_model` (and vLLM), and the verification says so.

``quantization_config`` is the one llm-compressor writes: one config group targeting ``Linear`` with
the weights' arguments (``actorder: "weight"`` when GPTQ ran with activation order: moetool's static
groups need no ``g_idx``), ``format: "pack-quantized"``, ``quantization_status: "compressed"`` and an
``ignore`` list of every linear module left in full precision (routers, ``lm_head``, attention, shared
experts, dense MLPs), by name as on disk and as transformers builds the model.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from moetool.arch.experts import layer_prefix
from moetool.errors import CheckpointError, ConfigError
from moetool.quantize.formats.base import StorageFormat, Stored, VerifyContext
from moetool.quantize.formats.ct_pack import (
    pack_int32,
    pack_int32_rows,
    unpack_int32,
    unpack_int32_rows,
    words_per_row,
)
from moetool.quantize.grids import group_bounds
from moetool.quantize.storage import PackedWeight, QuantFormat, concat_rows, stack_experts

if TYPE_CHECKING:
    import torch

    from moetool.io.checkpoint import Checkpoint
    from moetool.quantize.engine import LayerResult
    from moetool.quantize.layout import ExpertTensors, QuantLayout
    from moetool.quantize.verify import Check

QUANT_METHOD = "compressed-tensors"
PACK_FORMAT = "pack-quantized"
PACKED, SCALE, SHAPE, ZERO = "weight_packed", "weight_scale", "weight_shape", "weight_zero_point"
#: Code widths moetool writes in this format (what the servers' int MoE kernels take).
CT_BITS = (4, 8)
#: Group sizes the servers' MoE kernels take (0: one scale per output row, "channel").
KERNEL_GROUPS = (0, 32, 64, 128)
#: Per-expert projection names for families whose experts are fused on disk (vLLM's defaults).
FUSED_PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")
_SCALE_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def stored_base(name: str) -> str:
    """``a.b.weight`` -> ``a.b`` (compressed-tensors names hang off the module)."""
    return name[: -len(".weight")] if name.endswith(".weight") else name


def expert_bases(layout: QuantLayout, info: ExpertTensors) -> tuple[list[str], list[str], list[str]]:
    """The stored module names of each expert's gate, up and down projections, in expert order."""
    if not info.fused:
        return (
            [stored_base(n) for n in info.gate],
            [stored_base(n) for n in info.up],
            [stored_base(n) for n in info.down],
        )
    root = layer_prefix(layout.spec, layout.dims, info.layer) + layout.spec.experts_module
    return tuple(  # type: ignore[return-value]
        [f"{root}.{e}.{proj}" for e in range(info.num_experts)] for proj in FUSED_PROJ_NAMES
    )


def checkpoint_dtype(checkpoint: Checkpoint, layout: QuantLayout) -> str:
    """The dtype of the routed experts in the source (scales are stored in it, as the servers expect)."""
    dtype = checkpoint.tensors[layout.routed_names()[0]].dtype
    return _SCALE_DTYPES.get(dtype, "float32")


#: Why the non-uniform schemes cannot be stored here (any other: "... have no compressed-tensors format").
_OTHER_SCHEMES = {
    "ternary": "ternary codes are entropy coded, which compressed-tensors cannot store",
    "nf4": "NF4 codes have no compressed-tensors (or server) format",
}


class CompressedTensorsFormat(StorageFormat):
    """``quant_method: "compressed-tensors"``, ``format: "pack-quantized"``."""

    name = QUANT_METHOD
    quant_method = QUANT_METHOD
    packed_keys = r"\.weight_(packed|scale|shape|zero_point)$"

    # ------------------------------------------------------------------ what fits

    def unfit_reason(self, fmt: QuantFormat, layout: QuantLayout) -> str | None:
        if fmt.scheme != "uniform":  # compressed-tensors' int formats hold uniform codes only
            return _OTHER_SCHEMES.get(fmt.scheme, f"{fmt.scheme} codes have no compressed-tensors (or server) format")
        if fmt.bits not in CT_BITS:
            return f"{fmt.bits}-bit codes: the servers' int MoE kernels take 4 or 8 bits"
        if fmt.group_size:
            for width in sorted(_columns(layout)):
                if width % fmt.group_size:
                    return (
                        f"group size {fmt.group_size} does not divide a row of {width} columns (compressed-tensors "
                        "needs equal groups)"
                    )
        return None

    def kernel_reason(self, fmt: QuantFormat) -> str | None:
        """Why the servers' MoE kernels would not take these settings (``None``: they would)."""
        if fmt.group_size not in KERNEL_GROUPS:
            return f"group size {fmt.group_size} (vLLM's and SGLang's MoE kernels take 32, 64, 128 or per-row)"
        if not fmt.symmetric:
            return "asymmetric codes (SGLang's and vLLM's CPU MoE kernels need symmetric ones)"
        return None

    # ------------------------------------------------------------------ names

    def probe(self, spec: Any) -> Callable[[str], str]:
        fused = {t.name for t in spec.routed_experts} if not _per_expert(spec) else set()

        def name(original: str) -> str:
            relative = re.sub(r"^.*?\.(?:layers|blocks)\.\d+\.", "", original)
            if relative in fused:
                prefix = original[: len(original) - len(relative)]
                proj = FUSED_PROJ_NAMES[0] if relative == spec.routed_experts[0].name else FUSED_PROJ_NAMES[2]
                return f"{prefix}{spec.experts_module}.0.{proj}.{PACKED}"
            return f"{stored_base(original)}.{PACKED}"

        return name

    def stored(self, layout: QuantLayout, fmt: QuantFormat) -> list[Stored]:
        out: list[Stored] = []

        def add(base: str, original: str, params: int) -> None:
            out.append(Stored(f"{base}.{PACKED}", original, params))
            out.append(Stored(f"{base}.{SCALE}", original))
            out.append(Stored(f"{base}.{SHAPE}", original))
            if fmt.zero_point:
                out.append(Stored(f"{base}.{ZERO}", original))

        for info in layout.experts.values():
            i, h = info.intermediate, info.hidden
            gates, ups, downs = expert_bases(layout, info)
            for e in range(info.num_experts):
                add(gates[e], info.gate_up if info.fused else info.gate[e], i * h)  # type: ignore[arg-type]
                add(ups[e], info.gate_up if info.fused else info.up[e], i * h)  # type: ignore[arg-type]
                add(downs[e], info.down_fused if info.fused else info.down[e], i * h)  # type: ignore[arg-type]
        for group in layout.linears.values():
            for linear in group:
                add(stored_base(linear.name), linear.name, linear.shape[0] * linear.shape[1])
        return out

    # ------------------------------------------------------------------ writing

    def write_layer(self, writer: Any, layout: QuantLayout, layer: int, result: LayerResult, fmt: QuantFormat) -> None:
        import torch

        assert fmt.bits is not None
        bits = fmt.bits
        scale_dtype = getattr(torch, fmt.scale_dtype)

        def put(base: str, weight: Any) -> None:
            writer.add(f"{base}.{PACKED}", pack_int32(weight.codes, bits))
            writer.add(f"{base}.{SCALE}", weight.scale.to(scale_dtype).contiguous())
            writer.add(f"{base}.{SHAPE}", torch.tensor(list(weight.codes.shape), dtype=torch.int64))
            if fmt.zero_point:
                writer.add(f"{base}.{ZERO}", pack_int32_rows(weight.zero, bits))

        info = layout.experts.get(layer)
        if info is not None and result.experts is not None:
            gate_up, down = result.experts
            i = info.intermediate
            gates, ups, downs = expert_bases(layout, info)
            for e in range(info.num_experts):
                put(gates[e], gate_up.select(e, slice(0, i)))
                put(ups[e], gate_up.select(e, slice(i, 2 * i)))
                put(downs[e], down.select(e))
        for linear in layout.linears.get(layer, []):
            put(stored_base(linear.name), result.linears[linear.module])

    def config_entries(
        self, fmt: QuantFormat, layout: QuantLayout, model: Any, checkpoint: Checkpoint
    ) -> dict[str, Any]:
        return {"quantization_config": quantization_config(fmt, ignore_list(layout, model, checkpoint))}

    def usage(self, fmt: QuantFormat, layout: QuantLayout) -> str:
        fused = any(info.fused for info in layout.experts.values())
        loaders = (
            "Load it with `moetool.load_model(path)` (transformers 5 does not map quantized experts onto this "
            "family's fused experts)"
            if fused
            else "Load it with transformers' `AutoModelForCausalLM.from_pretrained(path)` (with the compressed-tensors "
            "package installed), or `moetool.load_model(path)`"
        )
        return f"It is in the compressed-tensors format: serve it with `vllm serve PATH` or SGLang. {loaders}."

    # ------------------------------------------------------------------ reading

    def read_format(self, config: dict[str, Any], checkpoint: Checkpoint) -> QuantFormat:
        return read_format(config, checkpoint)

    def read_layer(self, checkpoint: Checkpoint, layout: QuantLayout, fmt: QuantFormat, layer: int) -> dict[str, Any]:
        assert fmt.bits is not None
        bits = fmt.bits
        info = layout.experts.get(layer)
        linears = layout.linears.get(layer, [])
        bases: list[str] = []
        if info is not None:
            for group in expert_bases(layout, info):
                bases += group
        bases += [stored_base(lin.name) for lin in linears]
        suffixes = (PACKED, SCALE, SHAPE) + ((ZERO,) if fmt.zero_point else ())
        wanted = [f"{b}.{s}" for b in bases for s in suffixes]
        missing = [n for n in wanted if n not in checkpoint.tensors]
        if missing:
            raise CheckpointError(
                f"{checkpoint.name} lacks {missing[0]}"
                + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
                hint="the checkpoint does not match its quantization_config; re-create it",
                code="QUANT_SHAPE_MISMATCH",
            )
        tensors = dict(checkpoint.iter_tensors(wanted))

        def decode(base: str, rows: int, columns: int) -> PackedWeight:
            return _decode(tensors, base, rows, columns, fmt, bits)

        out: dict[str, Any] = {}
        if info is not None:
            i, h = info.intermediate, info.hidden
            gates, ups, downs = expert_bases(layout, info)
            gate_up = stack_experts(
                [concat_rows([decode(g, i, h), decode(u, i, h)]) for g, u in zip(gates, ups, strict=True)]
            )
            down = stack_experts([decode(d, h, i) for d in downs])
            out["experts"] = (gate_up, down)
        for linear in linears:
            out[linear.module] = decode(stored_base(linear.name), *linear.shape)
        return out

    # ------------------------------------------------------------------ checks

    def verify(self, ctx: VerifyContext) -> list[Check]:
        from moetool.quantize.formats.ct_verify import check_library, check_transformers

        return [check_library(ctx), *check_transformers(ctx)]


def transformers_limit(spec: Any, symmetric: bool) -> str | None:
    """Why stock transformers (5.25) cannot load moetool's compressed-tensors output of this family
    (``None``: it can). Its MoE loading dequantizes per-expert tensors it maps onto the family's fused
    experts, with scales only."""
    if not _per_expert(spec):
        return f"it maps no quantized per-expert tensors onto {spec.name}'s fused experts"
    if not symmetric:
        return "its MoE expert decompression drops zero points (asymmetric experts fail to load)"
    return None


def _per_expert(spec: Any) -> bool:
    from moetool.arch.spec import ExpertLayout

    return spec.expert_layout is ExpertLayout.PER_EXPERT


def _columns(layout: QuantLayout) -> set[int]:
    widths: set[int] = set()
    for info in layout.experts.values():
        widths |= {info.hidden, info.intermediate}
    for group in layout.linears.values():
        widths |= {lin.shape[1] for lin in group}
    return widths


def _decode(
    tensors: dict[str, torch.Tensor], base: str, rows: int, columns: int, fmt: QuantFormat, bits: int
) -> PackedWeight:
    """One stored weight as moetool's in-memory packed weight, every shape and dtype checked."""
    import torch

    from moetool.quantize.pack import pack_bits

    groups = len(group_bounds(columns, fmt.group_size))

    def expect(suffix: str, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        tensor = tensors[f"{base}.{suffix}"]
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"{base}.{suffix} is {str(tensor.dtype).removeprefix('torch.')} {list(tensor.shape)}, expected "
                f"{str(dtype).removeprefix('torch.')} {list(shape)}",
                hint="the checkpoint does not match its quantization_config; re-create it",
                code="QUANT_SHAPE_MISMATCH",
            )
        return tensor

    shape = expect(SHAPE, tensors[f"{base}.{SHAPE}"].dtype, (2,))
    if shape.dtype not in (torch.int64, torch.int32) or [int(x) for x in shape] != [rows, columns]:
        raise CheckpointError(
            f"{base}.{SHAPE} says {shape.tolist()}, the config implies {[rows, columns]}",
            hint="the checkpoint does not match its config.json; re-create it",
            code="QUANT_SHAPE_MISMATCH",
        )
    packed = expect(PACKED, torch.int32, (rows, words_per_row(columns, bits)))
    scale = expect(SCALE, getattr(torch, fmt.scale_dtype), (rows, groups))
    zero = None
    if fmt.zero_point:
        zero = unpack_int32_rows(expect(ZERO, torch.int32, (words_per_row(rows, bits), groups)), bits, rows)
    codes = pack_bits(unpack_int32(packed, bits, columns), bits)
    return PackedWeight(codes, scale, zero, bits, columns)


# ----------------------------------------------------------------------------- config


def weights_args(fmt: QuantFormat) -> dict[str, Any]:
    """The ``weights`` quantization arguments of the config group."""
    args: dict[str, Any] = {
        "num_bits": fmt.bits,
        "type": "int",
        "symmetric": fmt.symmetric,
        "group_size": fmt.group_size or None,
        "strategy": "group" if fmt.group_size else "channel",
        "dynamic": False,
    }
    if fmt.method == "gptq" and fmt.details.get("act_order"):
        # moetool's act-order GPTQ fixes each group's scale before reordering (static groups), which is
        # compressed-tensors' "weight" ordering: the stored layout is the plain one, no g_idx.
        args["actorder"] = "weight"
    return args


def quantization_config(fmt: QuantFormat, ignore: list[str]) -> dict[str, Any]:
    """The ``quantization_config`` block, as llm-compressor writes it."""
    return {
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": weights_args(fmt),
                "input_activations": None,
                "output_activations": None,
                "format": PACK_FORMAT,
            }
        },
        "quant_method": QUANT_METHOD,
        "kv_cache_scheme": None,
        "format": PACK_FORMAT,
        "quantization_status": "compressed",
        "global_compression_ratio": None,
        "ignore": ignore,
    }


def linear_module_names(config: dict[str, Any]) -> set[str]:
    """Every ``nn.Linear`` module of the transformers model a config builds (on the meta device)."""
    import torch
    from torch import nn
    from transformers import AutoConfig, AutoModelForCausalLM

    from moetool.modeling import quiet_transformers

    cfg = {k: v for k, v in config.items() if k not in ("quantization_config", "transformers_weights")}
    model_type = cfg.pop("model_type")
    with quiet_transformers(), torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    return {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}


def ignore_list(layout: QuantLayout, model: Any, checkpoint: Checkpoint | None = None) -> list[str]:
    """Every linear module left in full precision, ``lm_head`` first.

    From the transformers model (``model``, or one built on the meta device from ``checkpoint``'s
    config) and from the checkpoint's 2-D weights (servers name modules as the checkpoint does); routed
    experts are not ``nn.Linear`` modules in transformers 5 and are quantized.
    """
    from torch import nn

    from moetool.count.classify import TensorClassifier

    quantized = {stored_base(lin.name) for group in layout.linears.values() for lin in group}
    if model is not None:
        names = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    else:
        assert checkpoint is not None
        names = linear_module_names(checkpoint.config)
    if checkpoint is not None:
        classifier = TensorClassifier(layout.spec, layout.dims)
        experts = {n for info in layout.experts.values() for n in info.names()}
        for name, info in checkpoint.tensors.items():
            if not name.endswith(".weight") or len(info.shape) != 2 or name in experts:
                continue
            if classifier.classify(name).category in ("embedding", "norms", "routed_experts"):
                continue
            names.add(stored_base(name))
    names = {n for n in names if n not in quantized}
    names.discard("lm_head")
    return ["lm_head", *sorted(names)]


def read_format(config: dict[str, Any], checkpoint: Checkpoint) -> QuantFormat:
    """The settings of a pack-quantized compressed-tensors checkpoint moetool can decode itself.

    Raises:
        ConfigError: ``QUANT_CONFIG_INVALID``: not pack-quantized int weights of one group, or settings
            moetool's decoder does not handle (activation ordering with ``g_idx``, other widths).
    """
    where = f"{checkpoint.name}/config.json"
    qc = config.get("quantization_config") or {}

    def bad(why: str) -> ConfigError:
        return ConfigError(
            f"{where}: moetool cannot decode this compressed-tensors quantization: {why}",
            hint="install compressed-tensors and load it with transformers, or re-create it with moetool quantize",
            code="QUANT_CONFIG_INVALID",
        )

    groups = qc.get("config_groups")
    if qc.get("quant_method") != QUANT_METHOD or not isinstance(groups, dict) or len(groups) != 1:
        raise bad("expected one config group")
    group = next(iter(groups.values()))
    weights = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(weights, dict):
        raise bad("the config group has no weights")
    if (group.get("format") or qc.get("format")) != PACK_FORMAT:
        raise bad(f"format {group.get('format') or qc.get('format')!r}")
    if group.get("input_activations") or group.get("output_activations"):
        raise bad("activations are quantized too")
    bits = weights.get("num_bits")
    if weights.get("type", "int") != "int" or bits not in CT_BITS:
        raise bad(f"{weights.get('type')} {bits}-bit weights")
    strategy = weights.get("strategy")
    group_size = weights.get("group_size")
    if strategy == "channel":
        group_size = 0
    elif strategy != "group" or not isinstance(group_size, int) or isinstance(group_size, bool) or group_size <= 0:
        raise bad(f"strategy {strategy!r} with group size {group_size!r}")
    if weights.get("actorder") not in (None, False, "weight", "static"):
        raise bad(f"actorder {weights.get('actorder')!r} (g_idx)")
    scales = [info.dtype for name, info in checkpoint.tensors.items() if name.endswith(f".{SCALE}")]
    dtype = _SCALE_DTYPES.get(scales[0]) if scales else None
    if dtype is None:
        raise bad(f"weight scales of dtype {scales[0] if scales else 'none'}")
    categories = quantized_categories(config, checkpoint)
    unknown = [c for c in categories if c not in ("routed_experts", "shared_experts", "attention")]
    if unknown or "routed_experts" not in categories:
        raise bad(f"quantized {', '.join(unknown) or 'no routed experts'}")
    return QuantFormat(
        scheme="uniform",
        bits=bits,
        group_size=group_size,
        categories=tuple(c for c in ("routed_experts", "shared_experts", "attention") if c in categories),
        method="gptq" if weights.get("actorder") else "rtn",
        symmetric=bool(weights.get("symmetric", True)),
        storage=QUANT_METHOD,
        scale_dtype=dtype,
        value_dtype=dtype,
    )


def quantized_categories(config: dict[str, Any], checkpoint: Checkpoint) -> set[str]:
    """The parameter categories a compressed-tensors checkpoint stores packed (from its tensor names)."""
    from moetool.arch.dims import resolve_dims
    from moetool.arch.registry import family_for_config
    from moetool.count.classify import TensorClassifier

    spec = family_for_config(config)
    classifier = TensorClassifier(spec, resolve_dims(spec, config))
    per_expert = re.compile(rf"\.{re.escape(spec.experts_module)}\.\d+\.({'|'.join(FUSED_PROJ_NAMES)})$")
    found: set[str] = set()
    for name in checkpoint.tensors:
        if not name.endswith(f".{PACKED}"):
            continue
        base = name[: -len(PACKED) - 1]
        found.add("routed_experts" if per_expert.search(base) else classifier.classify(f"{base}.weight").category)
    return found
