"""Checks of a written compressed-tensors checkpoint against the reference readers.

* ``compressed-tensors``: the compressed-tensors library (the format's reference implementation)
  validates the ``quantization_config`` and decompresses every quantized weight; each must equal,
  bit for bit, the weight moetool's quantized model holds.
* ``transformers``: stock ``AutoModelForCausalLM.from_pretrained`` (``AutoModelForSeq2SeqLM`` for an
  encoder-decoder; with compressed-tensors installed,
  no moetool code involved) loads the folder with no missing, unexpected or mis-shaped tensors, and
  its logits match the in-memory quantized model. Where transformers is known not to load these
  experts (families fused on disk, written per expert under names it does not map; asymmetric
  experts, whose zero points its MoE loading drops) the load is still attempted and reported as it
  went, and moetool's own loader is checked instead.

Neither check claims what did not run: without the library both say they were skipped and why.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from moetool.quantize.verify import RELOAD_TOLERANCE, Check, VerificationError

if TYPE_CHECKING:
    from moetool.quantize.formats.base import VerifyContext

INSTALL_HINT = "pip install 'moetool[compressed-tensors]'"


def library_version() -> str | None:
    """The installed compressed-tensors version, or ``None``."""
    try:
        from importlib.metadata import version

        return version("compressed-tensors")
    except Exception:  # PackageNotFoundError, or a broken install
        return None


def _scheme(config: dict[str, Any]) -> Any:
    from compressed_tensors.quantization import QuantizationConfig

    qc = QuantizationConfig.model_validate(config["quantization_config"])
    return next(iter(qc.config_groups.values()))


def _decompress(scheme: Any, state: dict[str, Any]) -> Any:
    """The library's pack-quantized decompression of one module's tensors."""
    from compressed_tensors.compressors import BaseCompressor

    compressor = BaseCompressor.get_value_from_registry("pack-quantized")
    return compressor.decompress(state, scheme)["weight"]


def check_library(ctx: VerifyContext) -> Check:
    """Decompress every quantized weight with the compressed-tensors library and compare.

    Raises:
        VerificationError: a weight decompresses to something else than moetool's.
    """
    import hashlib

    from moetool.quantize.formats.compressed_tensors import PACKED, SCALE, SHAPE, ZERO, expert_bases, stored_base
    from moetool.quantize.verify import tensor_digest

    version = library_version()
    if version is None:
        return Check(
            "compressed-tensors", None, f"skipped: the compressed-tensors library is not installed ({INSTALL_HINT})"
        )
    try:
        scheme = _scheme(ctx.written.config)
    except Exception as exc:  # pydantic's ValidationError: our config block is not what the library reads
        raise VerificationError(
            f"compressed-tensors {version} rejects the written quantization_config: {str(exc).splitlines()[0]}",
            hint="this is a bug in moetool quantize; please report it",
        ) from None
    suffixes = (PACKED, SCALE, SHAPE) + ((ZERO,) if ctx.fmt.zero_point else ())
    compared = 0
    for layer in ctx.layout.layers:
        # What each fingerprint covers, in the order the quantizer hashed it: for the experts, every
        # expert's gate rows then up rows (gate_up), and every expert's down.
        groups: dict[str, list[str]] = {}
        info = ctx.layout.experts.get(layer)
        if info is not None:
            gates, ups, downs = expert_bases(ctx.layout, info)
            groups["gate_up"] = [base for e in range(info.num_experts) for base in (gates[e], ups[e])]
            groups["down"] = list(downs)
        for linear in ctx.layout.linears.get(layer, []):
            groups[linear.module] = [stored_base(linear.name)]
        names = [f"{base}.{s}" for bases in groups.values() for base in bases for s in suffixes]
        tensors = dict(ctx.written.iter_tensors(names))
        for what, bases in groups.items():
            hasher = hashlib.sha256()
            for base in bases:
                got = _decompress(scheme, {s: tensors[f"{base}.{s}"] for s in suffixes}).to(ctx.dtype)
                tensor_digest(got, hasher)
                compared += got.numel()
            if hasher.hexdigest() != ctx.digests.get(layer, {}).get(what):
                raise VerificationError(
                    f"compressed-tensors {version} decompresses layer {layer} {what} to other weights than "
                    "moetool's quantizer computed",
                    hint="this is a bug in moetool quantize; please report it",
                )
    return Check(
        "compressed-tensors",
        True,
        f"compressed-tensors {version} decompresses all {compared:,} quantized weights to exactly moetool's",
    )


def _logits_diff(want: Any, loaded: Any, input_ids: Any) -> tuple[float, float]:
    """Max abs difference between a loaded model's logits on the probe tokens and the streamed pass's."""
    import torch

    from moetool.quantize.verify import probe_inputs

    with torch.no_grad():
        got = loaded(**probe_inputs(loaded, input_ids), use_cache=False).logits.float()
    want = want.float().reshape(got.shape)
    return float((want - got).abs().max()), max(1.0, float(want.abs().max()))


def _check_loaded_weights(ctx: VerifyContext, loaded: Any, who: str) -> None:
    """Every quantized weight transformers loaded equals moetool's, value for value (by fingerprint)."""
    from moetool.quantize.loader import layer_modules
    from moetool.quantize.verify import tensor_digest

    layers = layer_modules(loaded, ctx.layout)
    for layer in ctx.layout.layers:
        module = layers[layer]
        pairs = []
        if layer in ctx.layout.experts:
            experts = module.get_submodule(ctx.layout.spec.experts_module)
            pairs += [("gate_up", experts.gate_up_proj), ("down", experts.down_proj)]
        pairs += [(lin.module, module.get_submodule(lin.module).weight) for lin in ctx.layout.linears.get(layer, [])]
        for name, got in pairs:
            if tensor_digest(got.detach().to(ctx.dtype)) != ctx.digests.get(layer, {}).get(name):
                raise VerificationError(
                    f"{who} loads other weights than moetool's for layer {layer} {name}",
                    hint="this is a bug in moetool quantize; please report it",
                )


def check_transformers(ctx: VerifyContext) -> list[Check]:
    """Load the folder with stock transformers and compare logits (see the module docstring).

    Raises:
        VerificationError: transformers loads a per-expert family with missing or unexpected tensors,
            fails, or gives other logits.
    """
    import warnings

    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from moetool.modeling import auto_model_class, quiet_transformers
    from moetool.quantize.loader import quiet_compressed_tensors
    from moetool.quantize.verify import check_reload

    if not ctx.full:
        return [Check("transformers", None, "skipped: the model is larger than the whole-model reload allows")]
    if library_version() is None:
        note = f"skipped: transformers needs the compressed-tensors library to load this format ({INSTALL_HINT})"
        return [Check("transformers", None, note), check_reload(ctx.folder, ctx.want_logits, ctx.sample_ids, ctx.dtype)]
    from moetool.quantize.formats.compressed_tensors import transformers_limit

    limit = transformers_limit(ctx.layout.spec, ctx.fmt.symmetric)
    dtype = ctx.dtype
    who = f"transformers {transformers.__version__}"
    # Encoder-decoders (Switch Transformers, NLLB-MoE) load as their sequence-to-sequence class, and
    # decompressed at load (transformers' own ``dequantize`` option): their weight init reads each
    # expert's ``wi.weight``, which a linear that stays compressed does not have.
    config = ctx.written.config
    options: dict[str, Any] = {}
    model_class = AutoModelForCausalLM
    if config.get("is_encoder_decoder"):
        from transformers import CompressedTensorsConfig

        model_class = auto_model_class(config)
        options["quantization_config"] = CompressedTensorsConfig(dequantize=True)
    try:
        with quiet_transformers(), quiet_compressed_tensors(), warnings.catch_warnings():
            # transformers warns that the folder's own quantization_config wins (it does; only
            # ``dequantize`` is taken from ours).
            warnings.filterwarnings("ignore", message="You passed `quantization_config`")
            loaded, info = model_class.from_pretrained(
                str(ctx.folder), dtype=dtype, output_loading_info=True, local_files_only=True, **options
            )
    except Exception as exc:
        if limit is None:
            raise VerificationError(
                f"{who} cannot load the written folder: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
                hint="this is a bug in moetool quantize; please report it",
            ) from None
        loaded, info = None, {"error": str(exc).splitlines()[0]}
    problems = {k: len(info.get(k) or ()) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    try:
        if loaded is not None and not any(problems.values()):
            loaded.eval()
            _check_loaded_weights(ctx, loaded, who)
            # transformers keeps dequantized experts in the scales' dtype (bfloat16 for a bfloat16 model)
            # even when asked for float32. The weights are checked equal above; the logits are compared
            # with the loaded model in the reference's dtype (exact: half-precision values widen exactly).
            half = any(p.dtype != dtype for p in loaded.parameters())
            with quiet_compressed_tensors():  # its hooks show progress bars when the model moves
                loaded.to(dtype)
                diff, scale = _logits_diff(ctx.want_logits, loaded, ctx.sample_ids)
            tolerance = RELOAD_TOLERANCE if dtype == torch.float32 else 5e-2
            if not diff <= tolerance * scale:
                raise VerificationError(
                    f"{who} loads the written folder but gives other logits (max diff {diff:.3g})",
                    hint="this is a bug in moetool quantize; please report it",
                )
            detail = (
                f"{who} from_pretrained, no missing or unexpected tensors, the same weights; logits max abs "
                f"diff {diff:.2e}" + (" (transformers holds the experts in the scales' dtype)" if half else "")
            )
            return [Check("transformers", True, detail, diff)]
    finally:
        del loaded
    what = info.get("error") or (
        f"{problems['missing_keys']} missing, {problems['unexpected_keys']} unexpected, "
        f"{problems['mismatched_keys']} mis-shaped tensors"
    )
    if limit is None:
        raise VerificationError(
            f"{who} loads the written folder with {what}",
            hint="this is a bug in moetool quantize; please report it",
        )
    note = f"not loadable: {who} fails as expected, {limit} ({what}); load it with moetool.load_model or vLLM"
    return [Check("transformers", None, note), check_reload(ctx.folder, ctx.want_logits, ctx.sample_ids, ctx.dtype)]
