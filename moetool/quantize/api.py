"""``quantize()``: an MoE checkpoint in, a checkpoint with quantized experts out, verified before it is published.

Steps: validate the options; open the source (refusing a dense or already-quantized model before
anything heavy); plan the tensors to rewrite from the family registry (:mod:`~moetool.quantize.layout`);
read the calibration text (GPTQ); load the model; record the calibration inputs of every decoder layer
(:mod:`~moetool.quantize.calibrate`); then, one decoder layer at a time, check that the in-memory
weights are the ones on disk, quantize (:mod:`~moetool.quantize.engine`) and stream that layer's packed
codes into the output shards. The untouched tensors are copied from the source unchanged, config.json
gets its ``quantization_config``, and the checks of :mod:`~moetool.quantize.verify` run in the staging
folder. Any failure, Ctrl-C or failed check leaves nothing at the output path.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from moetool.errors import CheckpointError, UsageError
from moetool.quantize.calibrate import CoverageOptions
from moetool.quantize.engine import METHODS, LayerReport, MethodOptions
from moetool.quantize.storage import UNIFORM_BITS, QuantFormat
from moetool.quantize.verify import FULL_CHECK_BYTES, Check, Verification

SCHEMA_VERSION = 1


@dataclass(frozen=True)
class QuantizeOptions:
    """What to quantize and how.

    Attributes:
        bits: bits per code (2, 3, 4 or 8); ignored with ``ternary``; must be 4 for ``nf4``.
        ternary: codes -1/0/+1 per group scale, entropy coded on disk (QMoE-style).
        method: ``gptq`` (needs calibration data), ``rtn`` or ``nf4``.
        group_size: input columns per scale; 0 for one scale per row. A last, shorter group is
            allowed when it does not divide a row.
        act_order: GPTQ: columns in order of decreasing Hessian diagonal.
        damp: GPTQ dampening, as a fraction of the mean Hessian diagonal.
        clip_search: uniform grids: search a shrunken range per group (GPTQ's ``mse`` option).
        ternary_bits: ternary: the bits per expert parameter (coded codes plus scales) to stay under.
            Each expert's scale is the smallest multiple of its rows' absmax whose codes are estimated
            to fit (a larger scale leaves more codes at 0); 0 turns this off and uses ``ternary_scale``.
        ternary_scale: ternary without a bit target: the scale as a multiple of each row's (or group's)
            absmax.
        attention / shared_experts: quantize those projections too.
        coverage: how calibration tokens reach experts.
        expert_batch: experts quantized together (0: a whole layer).
        device: where calibration and GPTQ run (``auto``: CUDA when available); the model itself stays
            in CPU memory and one decoder layer at a time moves to the device.
        dtype: the dtype the model is loaded in (``auto``: float32).
        max_shard_size: largest output weight file.
    """

    bits: int | None = 4
    ternary: bool = False
    method: str = "gptq"
    group_size: int = 128
    act_order: bool = True
    damp: float = 0.01
    clip_search: bool = False
    ternary_bits: float = 1.0
    ternary_scale: float = 1.0
    attention: bool = False
    shared_experts: bool = False
    coverage: CoverageOptions = field(default_factory=CoverageOptions)
    expert_batch: int = 0
    device: str = "auto"
    dtype: str = "auto"
    max_shard_size: str = "5GB"

    @property
    def categories(self) -> tuple[str, ...]:
        return (
            ("routed_experts",)
            + (("shared_experts",) if self.shared_experts else ())
            + (("attention",) if self.attention else ())
        )

    def format(self) -> QuantFormat:
        """The storage format these options give, after checking them.

        Raises:
            UsageError: an unknown method, bits outside {2, 3, 4, 8}, nf4 with other than 4 bits or with
                --ternary, a negative group size, a dampening outside (0, 1], a bad coverage option.
        """
        if self.method not in METHODS:
            raise UsageError(f"unknown --method {self.method!r}", hint="use gptq, rtn or nf4")
        if self.ternary:
            if self.method == "nf4":
                raise UsageError("--ternary and --method nf4 exclude each other", hint="use --method gptq or rtn")
            scheme, bits = "ternary", None
        elif self.method == "nf4":
            if self.bits not in (None, 4):
                raise UsageError(f"--method nf4 has 4-bit codes, not {self.bits}", hint="drop --bits or pass --bits 4")
            scheme, bits = "nf4", 4
        else:
            if self.bits not in UNIFORM_BITS:
                raise UsageError(
                    f"--bits must be 2, 3, 4 or 8, not {self.bits}",
                    hint="or pass --ternary for 1.58-bit codes stored below 1 bit",
                    code="BITS_INVALID",
                )
            scheme, bits = "uniform", self.bits
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise UsageError(f"--group-size must be 0 (one per row) or positive, not {self.group_size}")
        if not 0 < self.damp <= 1:
            raise UsageError(f"--damp must be in (0, 1], not {self.damp}")
        if not 0 < self.ternary_scale <= 4:
            raise UsageError(f"--ternary-scale must be in (0, 4], not {self.ternary_scale}")
        if self.ternary_bits < 0 or 0 < self.ternary_bits < 0.3:
            raise UsageError(
                f"--ternary-bits must be 0 (off) or at least 0.3, not {self.ternary_bits}",
                hint="ternary codes cannot be coded much below 0.3 bit with their scales",
            )
        if self.expert_batch < 0:
            raise UsageError("--expert-batch must be 0 (all experts) or positive")
        self.coverage.validate()
        details: dict[str, Any] = {}
        if self.method == "gptq":
            details = {"act_order": self.act_order, "damp": self.damp}
        if scheme == "uniform" and self.clip_search:
            details["clip_search"] = True
        if scheme == "ternary":
            details["ternary_bits_target"] = self.ternary_bits or None
            if not self.ternary_bits:
                details["ternary_scale"] = self.ternary_scale
        return QuantFormat(scheme, bits, self.group_size, self.categories, self.method, details)


@dataclass(frozen=True)
class CalibrationData:
    """The text GPTQ calibrates on (see :mod:`moetool.data`)."""

    dataset: str
    text_field: str = "text"
    split: str = "train"
    data_files: tuple[str, ...] = ()
    config_name: str | None = None
    max_tokens: int = 65536
    seq_len: int = 512
    batch_size: int = 8


@dataclass
class QuantizeResult:
    """What :func:`quantize` did (``--json`` prints :meth:`to_json`)."""

    source: str
    output: str
    format: QuantFormat
    options: QuantizeOptions
    family: str
    source_revision: str | None = None
    device: str = "cpu"
    layers: list[LayerReport] = field(default_factory=list)
    storage: dict[str, Any] = field(default_factory=dict)
    verification: Verification | None = None
    calibration: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    bytes_written: int = 0
    warnings: list[str] = field(default_factory=list)

    @property
    def expert_bits(self) -> float | None:
        """Bits per routed-expert parameter, from the bytes on disk."""
        entry = self.storage.get("routed_experts")
        return None if entry is None else entry.bits_per_param

    def to_json(self) -> dict[str, Any]:
        """The result as one JSON-able document (``schema_version`` 1)."""
        opts = self.options
        coverage = [layer.coverage.to_json() for layer in self.layers if layer.coverage is not None]
        return {
            "schema_version": SCHEMA_VERSION,
            "source": self.source,
            "source_revision": self.source_revision,
            "output": self.output,
            "family": self.family,
            "quantization": self.format.to_config(),
            "options": {
                "method": opts.method,
                "bits": self.format.bits,
                "ternary": opts.ternary,
                "group_size": opts.group_size,
                "act_order": opts.act_order,
                "damp": opts.damp,
                "clip_search": opts.clip_search,
                "categories": list(opts.categories),
                "device": self.device,
                "expert_batch": opts.expert_batch,
                "calib_all_experts": opts.coverage.all_experts,
                "max_tokens_per_expert": opts.coverage.max_tokens_per_expert,
                "min_tokens_per_expert": opts.coverage.min_tokens_per_expert,
                "fallback": opts.coverage.fallback,
            },
            "bits_per_param": {k: v.to_json() for k, v in self.storage.items()},
            "expert_bits_per_param": None if self.expert_bits is None else round(self.expert_bits, 4),
            "verification": None if self.verification is None else self.verification.to_json(),
            "calibration": self.calibration,
            "coverage": coverage,
            "layers": [layer.to_json() for layer in self.layers],
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "files": self.files,
            "bytes_written": self.bytes_written,
            "warnings": self.warnings,
        }


def _refuse_quantized(checkpoint: Any) -> None:
    from moetool.modeling import quant_method_of

    method = quant_method_of(checkpoint.config)
    if method is not None or "quantization_config" in checkpoint.config:
        raise CheckpointError(
            f"{checkpoint.name} is already quantized (quantization_config: {method or 'present'})",
            hint="quantize the original full-precision checkpoint",
            code="QUANTIZED_INPUT",
        )


def _linear_modules(layout: Any, layers: dict[int, Any]) -> dict[int, dict[str, Any]]:
    from torch import nn

    from moetool.errors import UnsupportedArchitectureError

    out: dict[int, dict[str, Any]] = {}
    for layer, linears in layout.linears.items():
        for linear in linears:
            try:
                module = layers[layer].get_submodule(linear.module)
            except AttributeError:
                module = None
            if not isinstance(module, nn.Linear) or tuple(module.weight.shape) != linear.shape:
                raise UnsupportedArchitectureError(
                    f"{linear.name} is not an nn.Linear named {linear.module} in the transformers model",
                    hint=f"drop --quantize-{linear.category.replace('_', '-')} for this family",
                )
            out.setdefault(layer, {})[linear.module] = module
    return out


def _check_mapping(checkpoint: Any, layout: Any, layer: int, experts: Any, linears: dict[str, Any]) -> None:
    """The weights about to be quantized are exactly the checkpoint's tensors (catches a wrong
    gate/up/down mapping before anything is written)."""
    import torch

    def same(stored: torch.Tensor, live: torch.Tensor) -> bool:
        live = live.detach().to("cpu")
        return tuple(stored.shape) == tuple(live.shape) and torch.equal(stored.to(live.dtype), live)

    bad: list[str] = []
    info = layout.experts.get(layer)
    if info is not None:
        i = info.intermediate
        tensors = dict(checkpoint.iter_tensors(info.names()))
        if info.fused:
            pairs = [(info.gate_up, experts.gate_up_proj), (info.down_fused, experts.down_proj)]
        else:
            pairs = []
            for e in range(info.num_experts):
                pairs += [
                    (info.gate[e], experts.gate_up_proj[e, :i]),
                    (info.up[e], experts.gate_up_proj[e, i:]),
                    (info.down[e], experts.down_proj[e]),
                ]
        bad += [name for name, live in pairs if not same(tensors[name], live)]
    for linear in layout.linears.get(layer, []):
        if not same(checkpoint.read_tensor(linear.name), linears[linear.module].weight):
            bad.append(linear.name)
    if bad:
        raise CheckpointError(
            f"the model transformers built does not hold {bad[0]} where moetool expects it"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""),
            hint="the installed transformers lays this family out differently; please report it",
            code="LAYOUT_MISMATCH",
        )


def _write_layer(writer: Any, layout: Any, layer: int, result: Any, fmt: QuantFormat) -> None:
    from moetool.quantize.storage import encode_weight, packed_names

    def put(name: str, weight: Any) -> None:
        names = packed_names(name)
        for suffix, tensor in encode_weight(weight, fmt).items():
            writer.add(names[suffix], tensor)

    info = layout.experts.get(layer)
    if info is not None and result.experts is not None:
        gate_up, down = result.experts
        if info.fused:
            put(info.gate_up, gate_up)
            put(info.down_fused, down)
        else:
            i = info.intermediate
            for e in range(info.num_experts):
                put(info.gate[e], gate_up.select(e, slice(0, i)))
                put(info.up[e], gate_up.select(e, slice(i, 2 * i)))
                put(info.down[e], down.select(e))
    for linear in layout.linears.get(layer, []):
        put(linear.name, result.linears[linear.module])


def quantize(
    source: Any,
    out: Path | str,
    options: QuantizeOptions,
    *,
    calibration: CalibrationData | None = None,
    verify: bool = True,
    full_check: bool | None = None,
    overwrite: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    offline: bool | None = None,
    command: str | Sequence[str] | None = None,
    on_status: Callable[[str], None] | None = None,
    on_layer: Callable[[LayerReport, int, int], None] | None = None,
) -> QuantizeResult:
    """Quantize the routed experts (and optionally attention / shared experts) of an MoE checkpoint.

    Args:
        source: a local folder, a Hub repo id, or an opened :class:`~moetool.io.checkpoint.Checkpoint`.
        out: the output folder.
        options: bits, method, groups, coverage, device.
        calibration: the calibration text (required for ``gptq``, unused otherwise).
        verify: run the checks of :mod:`moetool.quantize.verify` before publishing.
        full_check: reload the output through transformers and compare logits (``None``: when the
            source weighs at most 4 GB).
        overwrite: replace an existing output folder.
        revision / token / offline: Hub access for a repo id.
        command: the command line, for the model card.
        on_status: progress callback, a line saying what happens now.
        on_layer: called after each decoder layer with its report, its position and the layer count.

    Returns:
        What was written, measured and checked.

    Raises:
        UsageError: bad options; gptq without calibration data.
        CheckpointError: ``QUANTIZED_INPUT``, missing experts, ``LAYOUT_MISMATCH``.
        UnsupportedArchitectureError: ``NOT_MOE``, a family whose experts cannot be rewritten.
        OutputError: the output path exists (without ``overwrite``), overlaps the input, ...
        VerificationError: a failed check (nothing is published).
    """
    import torch

    from moetool.arch.dims import resolve_dims
    from moetool.arch.registry import family_for_config, require_capability
    from moetool.io.checkpoint import Checkpoint
    from moetool.io.writer import check_output_path
    from moetool.modeling import check_device_name, check_dtype_name, open_checkpoint, resolve_device
    from moetool.quantize.layout import build_layout

    status = on_status or (lambda _msg: None)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    fmt = options.format()
    check_device_name(options.device)
    check_dtype_name(options.dtype)
    needs_data = options.method == "gptq"
    if needs_data and calibration is None:
        raise UsageError("--method gptq needs calibration text", hint="pass --dataset, or use --method rtn")
    warnings: list[str] = []
    if calibration is not None and not needs_data:
        warnings.append(f"--dataset is not used by --method {options.method}")

    checkpoint = (
        source
        if isinstance(source, Checkpoint)
        else open_checkpoint(str(source), revision=revision, token=token, offline=offline)
    )
    _refuse_quantized(checkpoint)
    spec = family_for_config(checkpoint.config)
    require_capability(spec, "quantize")
    dims = resolve_dims(spec, checkpoint.config)
    layout = build_layout(spec, dims, checkpoint, options.categories)
    out = Path(out)
    check_output_path(out, [checkpoint.root], overwrite=overwrite)
    device = resolve_device(options.device)

    documents = None
    if needs_data and calibration is not None:
        from moetool.data import load_documents

        status(f"reading {calibration.dataset}")
        documents = load_documents(
            calibration.dataset,
            text_field=calibration.text_field,
            split=calibration.split,
            data_files=list(calibration.data_files) or None,
            config_name=calibration.config_name,
        )
    timings["plan"] = time.perf_counter() - started

    from moetool.modeling import load_tokenizer, load_weights
    from moetool.quantize.loader import decoder_layers, experts_module

    step = time.perf_counter()
    status(f"loading {checkpoint.name}")
    tokenizer = load_tokenizer(checkpoint) if needs_data else None
    model = load_weights(checkpoint, device="cpu", dtype=options.dtype)
    layers = decoder_layers(model)
    missing = [layer for layer in layout.layers if layer not in layers]
    if missing:
        raise CheckpointError(
            f"the transformers model has no decoder layer {missing[0]}",
            hint="the installed transformers lays this family out differently; please report it",
            code="LAYOUT_MISMATCH",
        )
    experts = {layer: experts_module(layers[layer], spec, layer) for layer in layout.experts}
    linears = _linear_modules(layout, layers)
    timings["load"] = time.perf_counter() - step

    inputs = None
    calibration_report = None
    sample_ids = None
    if needs_data:
        from moetool.data import iter_batches, iter_windows
        from moetool.evaluate import check_seq_len
        from moetool.quantize.calibrate import LayerInputs

        assert calibration is not None and documents is not None and tokenizer is not None
        step = time.perf_counter()
        seq_len = calibration.seq_len
        limit = checkpoint.config.get("max_position_embeddings")
        if isinstance(limit, int) and not isinstance(limit, bool) and 1 < limit < seq_len:
            warnings.append(f"--seq-len {seq_len} cut to the model's max_position_embeddings ({limit})")
            seq_len = limit
        check_seq_len(checkpoint.config, seq_len, checkpoint.name)
        status(f"recording calibration inputs ({calibration.max_tokens:,} tokens)")
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        windows = iter_windows(tokenizer, documents, seq_len=seq_len, max_tokens=calibration.max_tokens or None)
        batches = list(iter_batches(windows, batch_size=calibration.batch_size, pad_id=pad_id))
        if not batches:
            from moetool.errors import DatasetError

            raise DatasetError(f"{calibration.dataset} gave no calibration tokens", code="DATASET_EMPTY")
        sample_ids = batches[0].input_ids[:1, : min(64, batches[0].input_ids.shape[1])]
        inputs = LayerInputs.capture(model, layers, batches, device)
        calibration_report = {
            "dataset": calibration.dataset,
            "tokens": inputs.tokens,
            "windows": sum(int(b.input_ids.shape[0]) for b in batches),
            "seq_len": seq_len,
        }
        del batches
        timings["capture"] = time.perf_counter() - step

    from moetool.io.model_card import write_model_card
    from moetool.io.writer import ShardedWriter, copy_aux_files, parse_size, staged_output, write_json
    from moetool.quantize.engine import quantize_layer

    grid = fmt.grid(clip_search=options.clip_search, ternary_scale=options.ternary_scale)
    method_opts = MethodOptions(
        method=options.method,
        group_size=options.group_size,
        act_order=options.act_order,
        damp=options.damp,
        expert_batch=options.expert_batch,
        ternary_bits=options.ternary_bits if fmt.scheme == "ternary" else 0.0,
        split_gate_up=not any(e.fused for e in layout.experts.values()),
    )
    result = QuantizeResult(
        source=checkpoint.name,
        output=str(out),
        format=fmt,
        options=options,
        family=spec.name,
        source_revision=checkpoint.revision,
        device=str(device),
        calibration=calibration_report,
        timings=timings,
        warnings=warnings,
    )
    replaced = layout.quantized_names()
    with staged_output(out, inputs=[checkpoint.root], overwrite=overwrite) as staging:
        step = time.perf_counter()
        with ShardedWriter(staging, max_shard_size=parse_size(options.max_shard_size)) as writer:
            order = sorted(layers)
            for position, layer in enumerate(order):
                module = layers[layer]
                todo = layer in layout.experts or layer in layout.linears
                if not todo and inputs is None:
                    continue
                module.to(device)
                if todo:
                    status(f"quantizing layer {layer}")
                    _check_mapping(checkpoint, layout, layer, experts.get(layer), linears.get(layer, {}))
                    layer_result = quantize_layer(
                        layer,
                        module,
                        experts.get(layer),
                        linears.get(layer, {}),
                        grid=grid,
                        opts=method_opts,
                        coverage=options.coverage,
                        inputs=inputs,
                    )
                    _write_layer(writer, layout, layer, layer_result, fmt)
                    result.layers.append(layer_result.report)
                    del layer_result
                    if on_layer is not None:
                        on_layer(result.layers[-1], position, len(order))
                elif inputs is not None:
                    inputs.run(layer, module, keep=True)
                if device.type != "cpu":
                    module.to("cpu")
            del inputs
            timings["quantize"] = time.perf_counter() - step
            step = time.perf_counter()
            status("copying the other tensors")
            keep = [name for name in checkpoint.tensors if name not in replaced]
            for name, tensor in checkpoint.iter_tensors(keep):
                writer.add(name, tensor)
        config = dict(checkpoint.config)
        config["quantization_config"] = fmt.to_config()
        write_json(staging / "config.json", config)
        copy_aux_files(checkpoint.root, staging)
        timings["write"] = time.perf_counter() - step

        step = time.perf_counter()
        from moetool.quantize.verify import check_coverage, check_exact, check_reload, measure_storage

        written = Checkpoint.open(staging, name=str(out))
        storage = measure_storage(written, checkpoint, layout)
        result.storage = storage
        verification = Verification(storage=storage)
        verification.checks.append(check_coverage(written, checkpoint, layout, fmt))
        if verify:
            status("verifying the written codes")
            verification.checks.append(check_exact(written, layout, fmt, layers))
            full = full_check if full_check is not None else checkpoint.total_bytes() <= FULL_CHECK_BYTES
            if full:
                status("reloading the output with transformers")
                if sample_ids is None:
                    generator = torch.Generator().manual_seed(0)
                    vocab = int(model.get_input_embeddings().weight.shape[0])
                    sample_ids = torch.randint(0, vocab, (1, 32), generator=generator)
                verification.checks.append(check_reload(staging, model, sample_ids))
            else:
                verification.checks.append(
                    Check("reload", None, "skipped: the model is larger than the in-memory check allows")
                )
        result.verification = verification
        timings["verify"] = time.perf_counter() - step
        write_model_card(staging, **_card(result, command))
        result.files = sorted(p.name for p in staging.iterdir())
        result.bytes_written = sum(p.stat().st_size for p in staging.glob("*.safetensors"))
        status("publishing")
    timings["total"] = time.perf_counter() - started
    return result


def _card(result: QuantizeResult, command: str | Sequence[str] | None) -> dict[str, Any]:
    fmt = result.format
    bits = result.expert_bits
    summary = (
        f"The routed experts of {result.source} ({result.family}) were quantized by moetool to "
        f"{fmt.label} codes"
        + (f" ({bits:.3f} bits per expert parameter on disk)" if bits is not None else "")
        + "; router, norms, embeddings and lm_head are unchanged"
        + (" (attention quantized too)" if "attention" in fmt.categories else "")
        + (" (shared experts quantized too)" if "shared_experts" in fmt.categories else "")
        + ". Load it with `moetool.load_model(path)`, or `import moetool.quantize` before transformers' "
        "`AutoModelForCausalLM.from_pretrained(path)`: the experts dequantize on the fly."
    )
    results: dict[str, Any] = {}
    for category, entry in result.storage.items():
        if entry.params and entry.bits_per_param is not None:
            results[f"bits per parameter: {category}"] = round(entry.bits_per_param, 4)
    if result.verification is not None:
        for check in result.verification.checks:
            results[f"check {check.name}"] = check.detail
    if result.calibration:
        results["calibration tokens"] = result.calibration["tokens"]
    opts = result.options
    options: dict[str, Any] = {
        "method": opts.method,
        "scheme": fmt.scheme,
        "bits": fmt.bits,
        "group size": opts.group_size,
        "quantized": ", ".join(fmt.categories),
    }
    if opts.method == "gptq":
        # Key names avoid "token" followed by a word character, which the card masks as a secret.
        options.update(
            {
                "act order": opts.act_order,
                "dampening": opts.damp,
                "calibration": result.calibration["dataset"] if result.calibration else None,
                "calibrate all experts": opts.coverage.all_experts,
                "min tokens per expert": opts.coverage.min_tokens_per_expert,
                "max tokens per expert": opts.coverage.max_tokens_per_expert or "no cap",
                "fallback": opts.coverage.fallback,
            }
        )
    if fmt.scheme == "ternary":
        if opts.ternary_bits:
            options["ternary bits target"] = opts.ternary_bits
        else:
            options["ternary scale"] = opts.ternary_scale
    return {
        "base_models": [result.source],
        "relation": "quantized",
        "command": command if command is not None else "moetool quantize (library call)",
        "options": options,
        "revision": result.source_revision,
        "tags": ("quantized", fmt.scheme),
        "summary": summary,
        "results": results,
    }
