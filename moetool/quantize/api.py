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

from moetool.data import DatasetSpec
from moetool.errors import CheckpointError, UsageError
from moetool.progress import LAYERS, Progress, report
from moetool.quantize.engine import LayerReport
from moetool.quantize.methods import method_named
from moetool.quantize.request import QuantizeOptions
from moetool.quantize.storage import QuantFormat
from moetool.quantize.verify import Verification, tensor_digest

SCHEMA_VERSION = 1

__all__ = ["SCHEMA_VERSION", "QuantizeOptions", "QuantizeResult", "auto_expert_batch", "quantize"]


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
    memory: dict[str, Any] = field(default_factory=dict)
    expert_batch: int = 0
    format_reason: str = ""
    quantization_config: dict[str, Any] = field(default_factory=dict)

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
            "format": {"name": self.format.storage, "reason": self.format_reason},
            "quantization": self.quantization_config or self.format.to_config(),
            "options": {
                "method": opts.method,
                "bits": self.format.bits,
                "ternary": opts.ternary,
                "group_size": opts.group_size,
                "act_order": opts.act_order,
                "damp": opts.damp,
                "clip_search": opts.clip_search,
                "symmetric": self.format.symmetric,
                "categories": list(opts.categories),
                "device": self.device,
                "expert_batch": self.expert_batch or opts.expert_batch,
                "calib_all_experts": opts.coverage.all_experts,
                "max_tokens_per_expert": opts.coverage.max_tokens_per_expert,
                "min_tokens_per_expert": opts.coverage.min_tokens_per_expert,
                "fallback": opts.coverage.fallback,
                "whole_model": opts.whole_model,
                "offload_activations": opts.offload_activations,
            },
            "bits_per_param": {k: v.to_json() for k, v in self.storage.items()},
            "expert_bits_per_param": None if self.expert_bits is None else round(self.expert_bits, 4),
            "verification": None if self.verification is None else self.verification.to_json(),
            "calibration": self.calibration,
            "coverage": coverage,
            "layers": [layer.to_json() for layer in self.layers],
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "memory": self.memory,
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


def _linear_modules(layout: Any, layer: int, layer_module: Any) -> dict[str, Any]:
    """The ``nn.Linear`` modules of one decoder layer that the layout quantizes, by name in the layer."""
    from torch import nn

    from moetool.errors import UnsupportedArchitectureError

    out: dict[str, Any] = {}
    for linear in layout.linears.get(layer, []):
        try:
            module = layer_module.get_submodule(linear.module)
        except AttributeError:
            module = None
        if not isinstance(module, nn.Linear) or tuple(module.weight.shape) != linear.shape:
            hint = f"drop --quantize-{linear.category.replace('_', '-')} for this family"
            if linear.category == "routed_experts":
                hint = "the installed transformers lays this family's experts out differently; please report it"
            raise UnsupportedArchitectureError(
                f"{linear.name} is not an nn.Linear named {linear.module} in the transformers model", hint=hint
            )
        out[linear.module] = module
    return out


def _check_mapping(checkpoint: Any, layout: Any, layer: int, experts: Any, linears: dict[str, Any]) -> None:
    """The weights about to be quantized are exactly the checkpoint's tensors (catches a wrong
    gate/up/down mapping before anything is written). Reads one stored tensor at a time."""
    import torch

    def same(stored: torch.Tensor, live: torch.Tensor) -> bool:
        live = live.detach().to("cpu")
        # equal_nan: with --allow-nonfinite the same NaN sits in both copies.
        return tuple(stored.shape) == tuple(live.shape) and torch.allclose(
            stored.to(live.dtype), live, rtol=0, atol=0, equal_nan=True
        )

    pairs: dict[str, Any] = {}
    info = layout.experts.get(layer)
    if info is not None:
        i = info.intermediate
        if info.fused:
            pairs = {info.gate_up: experts.gate_up_proj, info.down_fused: experts.down_proj}
        else:
            for e in range(info.num_experts):
                pairs[info.gate[e]] = experts.gate_up_proj[e, :i]
                pairs[info.up[e]] = experts.gate_up_proj[e, i:]
                pairs[info.down[e]] = experts.down_proj[e]
    for linear in layout.linears.get(layer, []):
        pairs[linear.name] = linears[linear.module].weight
    bad = [name for name, stored in checkpoint.iter_tensors(pairs) if not same(stored, pairs[name])]
    if bad:
        raise CheckpointError(
            f"the model transformers built does not hold {bad[0]} where moetool expects it"
            + (f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""),
            hint="the installed transformers lays this family out differently; please report it",
            code="LAYOUT_MISMATCH",
        )


class _StepInputs:
    """The calibration batches of a streamed pass, as the engine runs them (one layer, several passes).

    The engine calls :meth:`run` for its statistics passes and its final pass, and its hooks read
    :attr:`current_mask` (padding never enters a Hessian).
    """

    def __init__(self, step: Any, batches: set[int], tokens: int, ranks: Any) -> None:
        self.step = step
        self.batches = batches
        self.tokens = tokens
        self.ranks = ranks

    def run(self, layer: int, module: Any, *, keep: bool) -> None:
        self.step.run(keep=keep, only=self.batches)

    def reduce(self, tensor: Any) -> Any:
        """Hessians and counts summed over the processes (each calibrated on a share of the batches)."""
        return self.ranks.sum_(tensor)

    @property
    def current_mask(self) -> Any:
        return self.step.current_mask


#: Bytes of GPTQ work per expert, per (hidden, intermediate): the chunk's Hessians and GPTQ's copies of
#: them (inverse, Cholesky factors, act-order gathers) and of the weights (working copy, dequantized, codes).
def gptq_bytes_per_expert(hidden: int, intermediate: int) -> int:
    """Memory GPTQ needs per expert of a chunk (float32 work), the larger of gate/up and down."""
    gate_up = 8 * hidden * hidden + 3 * 2 * intermediate * hidden
    down = 8 * intermediate * intermediate + 3 * hidden * intermediate
    return 4 * max(gate_up, down)


#: The least memory GPTQ's chunk may take: below this, chunking only costs speed.
MIN_GPTQ_BUDGET = 256 * 10**6


def auto_expert_batch(layout: Any, device: Any) -> int:
    """How many experts GPTQ quantizes together when ``--expert-batch 0``.

    On the CPU, the chunk's work stays within one layer's experts in bfloat16 (so quantizing holds about
    three layers' worth: the layer in float32 plus the chunk), at least :data:`MIN_GPTQ_BUDGET`; on an
    accelerator, within a quarter of its free memory (usually the whole layer: fastest).
    """
    from moetool.runner.memory import available_bytes

    # (experts, hidden, intermediate) per MoE layer: fused or per-expert experts, or linear-map experts.
    shapes = [(info.num_experts, info.hidden, info.intermediate) for info in layout.experts.values()]
    for group in layout.linears.values():
        ups = [lin for lin in group if lin.expert is not None and lin.role == "up"]
        if ups:
            shapes.append((len(ups), ups[0].shape[1], ups[0].shape[0]))
    largest = 1
    for num_experts, hidden, intermediate in shapes:
        per_expert = gptq_bytes_per_expert(hidden, intermediate)
        if getattr(device, "type", "cpu") == "cpu":
            budget = max(MIN_GPTQ_BUDGET, num_experts * 3 * intermediate * hidden * 2)
        else:
            budget = available_bytes(device) // 4
        largest = max(largest, min(num_experts, max(1, budget // per_expert)))
    return largest


def _probe_batch(ids: Any) -> Any:
    """One window of token ids as a batch (the sample the logits check compares on)."""
    import torch

    from moetool.data import Batch

    ids = ids.reshape(1, -1).long()
    return Batch(ids, torch.ones_like(ids), [None])


def _layer_digests(layout: Any, layer: int, experts: Any, linears: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    if layer in layout.experts and experts is not None:
        out["gate_up"] = tensor_digest(experts.gate_up_proj)
        out["down"] = tensor_digest(experts.down_proj)
    for name, module in linears.items():
        out[name] = tensor_digest(module.weight)
    return out


def _read_calibration(calibration: DatasetSpec, status: Callable[[str], None]) -> list[Any]:
    status(f"reading {calibration.dataset}")
    return calibration.load()


def _calibration_batches(
    checkpoint: Any, tokenizer: Any, documents: list[Any], calibration: DatasetSpec, warnings: list[str]
) -> tuple[list[Any], int]:
    """The calibration windows, batched; the sequence length actually used."""
    from moetool.data import iter_batches, iter_windows
    from moetool.errors import DatasetError
    from moetool.evaluate import check_seq_len

    seq_len = calibration.seq_len
    limit = checkpoint.config.get("max_position_embeddings")
    if isinstance(limit, int) and not isinstance(limit, bool) and 1 < limit < seq_len:
        warnings.append(f"--seq-len {seq_len} cut to the model's max_position_embeddings ({limit})")
        seq_len = limit
    check_seq_len(checkpoint.config, seq_len, checkpoint.name)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows = iter_windows(tokenizer, documents, seq_len=seq_len, max_tokens=calibration.max_tokens or None)
    batches = list(iter_batches(windows, batch_size=calibration.batch_size, pad_id=pad_id))
    if not batches:
        raise DatasetError(f"{calibration.dataset} gave no calibration tokens", code="DATASET_EMPTY")
    return batches, seq_len


@dataclass
class _PassOutcome:
    """What the layer-by-layer pass produced besides the written codes."""

    digests: dict[int, dict[str, str]] = field(default_factory=dict)
    original_logits: Any = None
    quantized_logits: Any = None
    calibration_tokens: int = 0


def _quantize_pass(
    runner: Any,
    layout: Any,
    spec: Any,
    fmt: QuantFormat,
    options: QuantizeOptions,
    calibration_batches: list[Any],
    probe: Any,
    writer: Any,
    result: QuantizeResult,
    status: Callable[[str], None],
    progress: Progress | None,
    ranks: Any,
    storage: Any,
) -> _PassOutcome:
    """One layer-major pass: each decoder layer is loaded, calibrated, quantized, written and released.

    The probe window runs through every layer twice, before quantization (original weights) and after
    (quantized), so the two models' logits can be compared at the end without holding either model.
    With several processes each calibrates on its share of the batches (``calibration_batches`` are this
    process's), the Hessians are summed, every process quantizes the same way and only the first one
    writes (``writer`` is ``None`` on the others).
    """
    from moetool.quantize.engine import LayerJob, quantize_layer
    from moetool.quantize.layout import layer_of_path
    from moetool.quantize.loader import experts_module

    method = method_named(options.method)
    grid = fmt.grid(clip_search=options.clip_search, ternary_scale=options.ternary_scale)
    split_gate_up = not any(e.fused for e in layout.experts.values())

    calib = set(range(len(calibration_batches)))
    probe_original, probe_quantized = len(calibration_batches), len(calibration_batches) + 1
    batches = [*calibration_batches, probe, probe]
    outcome = _PassOutcome(
        calibration_tokens=ranks.sum_int(sum(int(b.attention_mask.sum()) for b in calibration_batches))
    )
    total = len(runner.layer_paths)
    seen: set[int] = set()
    with runner.run(batches, logits={probe_original, probe_quantized}) as schedule:
        for step in schedule.steps():
            # GPTQ's inputs must not depend on the thread count: every layer run of the pass (also the
            # layers only passed through) on the fixed thread count of moetool.quantize.gptq.
            with method.fixed_threads(runner.device):
                layer = layer_of_path(spec, layout.dims, step.path)
                step.run(keep=True, only={probe_original})
                if layer in layout.experts or layer in layout.linears:
                    seen.add(layer)
                    status(f"quantizing layer {layer}")
                    experts = experts_module(step.module, spec, layer) if layer in layout.experts else None
                    linears = _linear_modules(layout, layer, step.module)
                    _check_mapping(runner.checkpoint, layout, layer, experts, linears)
                    inputs = None
                    if calib and method.needs_data:
                        inputs = _StepInputs(step, calib, outcome.calibration_tokens, ranks)
                    job = LayerJob(
                        layer,
                        step.module,
                        experts,
                        linears,
                        grid,
                        options,
                        inputs,
                        expert_batch=result.expert_batch,
                        split_gate_up=split_gate_up,
                        routed={
                            lin.module: (lin.expert, lin.role)
                            for lin in layout.linears.get(layer, [])
                            if lin.expert is not None and lin.role is not None
                        },
                    )
                    layer_result = quantize_layer(job)
                    del job
                    if writer is not None:
                        storage.write_layer(writer, layout, layer, layer_result, fmt)
                        outcome.digests[layer] = _layer_digests(layout, layer, experts, linears)
                    result.layers.append(layer_result.report)
                    del layer_result
                    if progress is not None:
                        done = result.layers[-1]
                        detail = f"layer {done.layer} done in {done.seconds:.1f}s ({step.position + 1}/{total})"
                        progress("quantizing", 1, total, unit=LAYERS, detail=detail, log=True)
                step.run(keep=True, only=calib)
                step.run(keep=True, only={probe_quantized})
        for batch, logits in schedule.logits():
            if batch == probe_original:
                outcome.original_logits = logits.float().cpu()
            else:
                outcome.quantized_logits = logits.float().cpu()
    missing = [layer for layer in layout.layers if layer not in seen]
    if missing:
        raise CheckpointError(
            f"the transformers model never ran decoder layer {missing[0]}, which holds experts to quantize",
            hint="the installed transformers lays this family out differently; please report it",
            code="LAYOUT_MISMATCH",
        )
    return outcome


def quantize(
    source: Any,
    out: Path | str,
    options: QuantizeOptions,
    *,
    calibration: DatasetSpec | None = None,
    verify: bool = True,
    full_check: bool | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    offline: bool | None = None,
    command: str | Sequence[str] | None = None,
    progress: Progress | None = None,
) -> QuantizeResult:
    """Quantize the routed experts (and optionally attention / shared experts) of an MoE checkpoint.

    The model is never held whole: one pass reads each decoder layer's weights once, runs the
    calibration tokens through it, quantizes it, writes its codes and frees it before the next layer
    (``options.whole_model`` loads it whole instead, for comparison).

    Args:
        source: a local folder, a Hub repo id, or an opened :class:`~moetool.io.checkpoint.Checkpoint`.
        out: the output folder.
        options: bits, method, groups, coverage, device.
        calibration: the calibration text (required for ``gptq``, unused otherwise).
        verify: run the checks of :mod:`moetool.quantize.verify` before publishing.
        full_check: also reload the output whole through transformers and compare logits (``None``: when
            that costs no more memory than quantizing did: the whole model in the compute dtype within one
            layer plus GPTQ's budget; larger models are checked layer by layer only).
        overwrite: replace an existing output folder.
        allow_nonfinite: process an input holding NaN/Inf (refused otherwise) and publish such an output.
        revision / token / offline: Hub access for a repo id.
        command: the command line, for the model card.
        progress: reports each step as a status line and ``quantizing`` in decoder layers, each with its time
            (:mod:`moetool.progress`).

    Returns:
        What was written, measured and checked.

    Raises:
        UsageError: bad options; gptq without calibration data.
        CheckpointError: ``QUANTIZED_INPUT``, missing experts, ``LAYOUT_MISMATCH``.
        UnsupportedArchitectureError: ``NOT_MOE``, a family whose experts cannot be rewritten.
        OutputError: the output path exists (without ``overwrite``), overlaps the input, ...
        InsufficientMemoryError: one layer and the calibration activations cannot fit.
        VerificationError: a failed check (nothing is published).
    """

    def status(message: str) -> None:
        report(progress, message)

    timings: dict[str, float] = {}
    started = time.perf_counter()
    plan = _plan(
        source,
        out,
        options,
        calibration,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
        revision=revision,
        token=token,
        offline=offline,
        status=status,
    )
    timings["plan"] = time.perf_counter() - started
    step = time.perf_counter()
    loaded = _load(plan, options, calibration, status)
    timings["load"] = time.perf_counter() - step
    result = QuantizeResult(
        source=plan.checkpoint.name,
        output=str(plan.out),
        format=plan.fmt,
        options=options,
        family=plan.spec.name,
        source_revision=plan.checkpoint.revision,
        device=str(loaded.runner.device),
        calibration=loaded.calibration_report,
        timings=timings,
        warnings=plan.warnings,
        memory=loaded.memory.to_json(loaded.positions) | {"streamed": not options.whole_model},
        expert_batch=options.expert_batch or auto_expert_batch(plan.layout, loaded.runner.device),
        format_reason=plan.choice.reason,
    )
    status(_memory_line(plan, loaded, options, result.expert_batch))
    if not loaded.ranks.is_main:
        # The other processes calibrate their share and quantize alike; the first one writes and checks.
        _quantize_pass(
            loaded.runner, plan.layout, plan.spec, plan.fmt, options, loaded.batches,
            _probe_batch(loaded.probe_ids), None, result, status, None, loaded.ranks,
        )  # fmt: skip
        loaded.ranks.barrier()
        return result
    _write_output(
        plan,
        loaded,
        options,
        result,
        verify=verify,
        full_check=full_check,
        overwrite=overwrite,
        allow_nonfinite=allow_nonfinite,
        command=command,
        status=status,
        progress=progress,
    )
    loaded.ranks.barrier()
    timings["total"] = time.perf_counter() - started
    return result


@dataclass
class _Plan:
    """What the checks before any heavy work settled: the source, what to rewrite, how, and where."""

    checkpoint: Any
    spec: Any
    layout: Any
    choice: Any  # moetool.quantize.formats.Choice: the storage format and the settings it stores
    out: Path
    warnings: list[str]
    documents: list[Any] | None

    @property
    def storage(self) -> Any:
        return self.choice.storage

    @property
    def fmt(self) -> QuantFormat:
        return self.choice.fmt


def _plan(
    source: Any,
    out: Path | str,
    options: QuantizeOptions,
    calibration: DatasetSpec | None,
    *,
    overwrite: bool,
    allow_nonfinite: bool,
    revision: str | None,
    token: str | bool | None,
    offline: bool | None,
    status: Callable[[str], None],
) -> _Plan:
    """Step 1: check the run's devices and data, open and check the source (refusing a dense or quantized
    model), plan the tensors to rewrite, choose the storage format, check the output path and disk space,
    and read the calibration text. Nothing heavy is loaded yet."""
    from moetool.arch.dims import resolve_dims
    from moetool.arch.registry import family_for_config, require_capability
    from moetool.io.checkpoint import Checkpoint
    from moetool.io.sizes import estimate_quantized_bytes
    from moetool.io.writer import check_disk_space, check_output_path
    from moetool.modeling import check_device_name, check_dtype_name, open_checkpoint
    from moetool.quantize.formats import resolve
    from moetool.quantize.layout import build_layout
    from moetool.validate import check_input

    method = method_named(options.method)
    check_device_name(options.device)
    check_dtype_name(options.dtype)
    needs_data = method.needs_data
    if needs_data and calibration is None:
        raise UsageError(f"--method {method.name} needs calibration text", hint="pass --dataset, or use --method rtn")
    warnings: list[str] = []
    if calibration is not None and not needs_data:
        warnings.append(f"--dataset is not used by --method {options.method}")

    checkpoint = (
        source
        if isinstance(source, Checkpoint)
        else open_checkpoint(str(source), revision=revision, token=token, offline=offline)
    )
    check_input(checkpoint, float_weights=True, allow_nonfinite=allow_nonfinite)
    _refuse_quantized(checkpoint)
    spec = family_for_config(checkpoint.config)
    require_capability(spec, "quantize")
    dims = resolve_dims(spec, checkpoint.config)
    layout = build_layout(spec, dims, checkpoint, options.categories)
    choice = resolve(options.output_format, options.symmetric, options.format(), layout, checkpoint)
    warnings += [choice.warning] if choice.warning else []
    out = Path(out)
    check_output_path(out, [checkpoint.root], overwrite=overwrite)
    predicted = estimate_quantized_bytes(checkpoint, layout.quantized_names(), choice.fmt)
    check_disk_space(out, predicted, what="the quantized model")
    documents = _read_calibration(calibration, status) if needs_data and calibration is not None else None
    return _Plan(checkpoint, spec, layout, choice, out, warnings, documents)


@dataclass
class _Loaded:
    """The opened model and its inputs: calibration batches (this process's share) and the probe window."""

    runner: Any
    ranks: Any
    batches: list[Any]
    calibration_report: dict[str, Any] | None
    probe_ids: Any
    positions: int
    memory: Any


def _load(
    plan: _Plan, options: QuantizeOptions, calibration: DatasetSpec | None, status: Callable[[str], None]
) -> _Loaded:
    """Step 2: open the model (one layer at a time, or whole), tokenize the calibration windows, pick the
    probe window, and check that one layer and the activations fit in memory."""
    import torch

    from moetool.modeling import load_tokenizer
    from moetool.runner.dist import current_ranks
    from moetool.runner.memory import check_fits, estimate
    from moetool.runner.stream import StreamedModel, StreamOptions

    checkpoint = plan.checkpoint
    needs_data = method_named(options.method).needs_data
    ranks = current_ranks(options.device)
    status(f"opening {checkpoint.name}" + (" (whole model)" if options.whole_model else " (one layer at a time)"))
    tokenizer = load_tokenizer(checkpoint) if needs_data else None
    runner = StreamedModel(
        checkpoint,
        StreamOptions(
            device=options.device,
            dtype=options.dtype,
            hidden="cpu" if options.offload_activations else "auto",
            whole_model=options.whole_model,
        ),
    )
    batches: list[Any] = []
    calibration_report = None
    if needs_data:
        documents = plan.documents
        assert calibration is not None and documents is not None and tokenizer is not None
        batches, seq_len = _calibration_batches(checkpoint, tokenizer, documents, calibration, plan.warnings)
        probe_ids = batches[0].input_ids[0, : min(64, int(batches[0].attention_mask[0].sum()))]
        calibration_report = {
            "dataset": calibration.dataset,
            "tokens": sum(int(b.attention_mask.sum()) for b in batches),
            "windows": sum(int(b.input_ids.shape[0]) for b in batches),
            "seq_len": seq_len,
            "processes": ranks.world,
        }
        batches = list(ranks.shard(batches))
        plan.documents = None  # the windows hold the text now
    else:
        vocab = int(runner.model.get_input_embeddings().weight.shape[0])
        probe_ids = torch.randint(0, vocab, (32,), generator=torch.Generator().manual_seed(0))
    positions = sum(int(b.input_ids.numel()) for b in batches) + 2 * int(probe_ids.numel())
    memory = estimate(checkpoint, str(runner.dtype).removeprefix("torch."))
    check_fits(memory, tokens=positions, device=runner.device, whole_model=options.whole_model)
    return _Loaded(runner, ranks, batches, calibration_report, probe_ids, positions, memory)


def _memory_line(plan: _Plan, loaded: _Loaded, options: QuantizeOptions, expert_batch: int) -> str:
    """The status line that says where the run computes and what it will hold."""
    from moetool.runner.memory import human

    memory, positions = loaded.memory, loaded.positions
    return (
        f"{'whole model' if options.whole_model else 'one layer at a time'} on {loaded.runner.device} "
        f"({memory.dtype}): largest layer {human(memory.largest_layer_bytes)}, calibration activations "
        f"{human(memory.activations(positions))}, "
        + method_named(options.method).memory_note(expert_batch)
        + "peak about "
        f"{human(memory.whole_peak(positions) if options.whole_model else memory.streamed_peak(positions))}"
    )


def _write_output(
    plan: _Plan,
    loaded: _Loaded,
    options: QuantizeOptions,
    result: QuantizeResult,
    *,
    verify: bool,
    full_check: bool | None,
    overwrite: bool,
    allow_nonfinite: bool,
    command: str | Sequence[str] | None,
    status: Callable[[str], None],
    progress: Progress | None,
) -> None:
    """Step 3 (the first process): in a staging folder, quantize and write layer by layer, copy the other
    tensors, write config.json, verify, write the model card; then publish."""
    from moetool.io.model_card import write_model_card
    from moetool.io.shards import ShardWriter
    from moetool.io.writer import copy_aux_files, staged_output, write_json

    checkpoint, layout, storage, fmt, out = plan.checkpoint, plan.layout, plan.storage, plan.fmt, plan.out
    timings = result.timings
    replaced = layout.quantized_names()
    with staged_output(out, inputs=[checkpoint.root], overwrite=overwrite, allow_nonfinite=allow_nonfinite) as staging:
        step = time.perf_counter()
        with ShardWriter(staging, max_shard_size=options.max_shard_size) as writer:
            outcome = _quantize_pass(
                loaded.runner,
                layout,
                plan.spec,
                fmt,
                options,
                loaded.batches,
                _probe_batch(loaded.probe_ids),
                writer,
                result,
                status,
                progress,
                loaded.ranks,
                storage,
            )
            loaded.batches = []  # free the calibration activations' inputs before copying
            timings["quantize"] = time.perf_counter() - step
            step = time.perf_counter()
            status("copying the other tensors")
            keep = [name for name in checkpoint.tensors if name not in replaced]
            for name, tensor in checkpoint.iter_tensors(keep):
                writer.add(name, tensor)
        config = dict(checkpoint.config)
        config.update(storage.config_entries(fmt, layout, loaded.runner.model, checkpoint))
        result.quantization_config = config["quantization_config"]
        write_json(staging / "config.json", config)
        copy_aux_files(checkpoint.root, staging)
        timings["write"] = time.perf_counter() - step

        step = time.perf_counter()
        result.verification = _verify(
            staging,
            out,
            checkpoint,
            layout,
            fmt,
            loaded.runner,
            outcome,
            loaded.probe_ids,
            storage,
            verify=verify,
            full_check=full_check,
            status=status,
        )
        result.storage = result.verification.storage
        timings["verify"] = time.perf_counter() - step
        write_model_card(staging, **_card(result, command, storage.usage(fmt, layout)))
        result.files = sorted(p.name for p in staging.iterdir())
        result.bytes_written = sum(p.stat().st_size for p in staging.glob("*.safetensors"))
        status("publishing")


def _verify(
    staging: Path,
    out: Path,
    checkpoint: Any,
    layout: Any,
    fmt: QuantFormat,
    runner: Any,
    outcome: _PassOutcome,
    probe_ids: Any,
    storage: Any,
    *,
    verify: bool,
    full_check: bool | None,
    status: Callable[[str], None],
) -> Verification:
    """The checks of :mod:`moetool.quantize.verify` and the format's own on the staging folder, one layer in
    memory at a time (the whole model only for a reload that costs no more memory than quantizing did)."""
    from moetool.io.checkpoint import Checkpoint
    from moetool.quantize.formats import VerifyContext
    from moetool.quantize.verify import check_coverage, check_decoded, check_probe_logits, measure_storage
    from moetool.runner.memory import estimate

    written = Checkpoint.open(staging, name=str(out))
    stored = storage.stored(layout, fmt)
    verification = Verification(storage=measure_storage(written, checkpoint, layout, stored))
    verification.checks.append(check_coverage(written, checkpoint, layout, stored))
    if not verify:
        return verification
    status("verifying the written codes, layer by layer")
    verification.checks.append(check_decoded(written, layout, fmt, outcome.digests, runner.dtype))
    verification.checks.append(check_probe_logits(outcome.original_logits, outcome.quantized_logits))
    full = full_check
    if full is None:
        sizes = estimate(checkpoint, str(runner.dtype).removeprefix("torch."))
        full = sizes.weights_by_dtype[sizes.dtype] <= sizes.largest_layer_bytes + MIN_GPTQ_BUDGET
    if full:
        status("reloading the output whole")
    context = VerifyContext(
        folder=staging,
        written=written,
        source=checkpoint,
        layout=layout,
        fmt=fmt,
        digests=outcome.digests,
        want_logits=outcome.quantized_logits,
        sample_ids=probe_ids,
        dtype=runner.dtype,
        full=full,
    )
    verification.checks += storage.verify(context)
    return verification


def _card(result: QuantizeResult, command: str | Sequence[str] | None, usage: str) -> dict[str, Any]:
    fmt = result.format
    bits = result.expert_bits
    summary = (
        f"The routed experts of {result.source} ({result.family}) were quantized by moetool to "
        f"{fmt.label} codes"
        + (f" ({bits:.3f} bits per expert parameter on disk)" if bits is not None else "")
        + "; router, norms, embeddings and lm_head are unchanged"
        + (" (attention quantized too)" if "attention" in fmt.categories else "")
        + (" (shared experts quantized too)" if "shared_experts" in fmt.categories else "")
        + ". "
        + usage
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
        "format": fmt.storage,
        "scheme": fmt.scheme + (" symmetric" if fmt.symmetric else ""),
        "bits": fmt.bits,
        "group size": opts.group_size,
        "quantized": ", ".join(fmt.categories),
    }
    options.update(method_named(opts.method).card_options(opts, result.calibration))
    options.update(fmt.spec.card_options(opts))
    return {
        "base_models": [result.source],
        "relation": "quantized",
        "command": command if command is not None else "moetool quantize (library call)",
        "options": options,
        "revision": result.source_revision,
        "tags": ("quantized", fmt.scheme, fmt.storage),
        "summary": summary,
        "results": results,
    }
