"""Quantize one decoder layer of a loaded model: its routed experts, and optionally its linears.

GPTQ, per layer (true-sequential inside the layer, as in the GPTQ paper):

1. run the layer on the calibration inputs, collecting the experts' gate/up Hessians (and those of the
   attention / shared-expert linears when they are quantized);
2. quantize those weights (all experts in one batched GPTQ call, or ``expert_batch`` at a time) and
   write the dequantized values into the model;
3. run the layer again, collecting the down-projection Hessians from the *quantized* gate/up outputs;
   quantize the down projections;
4. run the layer a last time: its quantized output is the next layer's input.

Round-to-nearest and NF4 need no data: every weight is quantized from the weights alone.

Besides the codes, each layer reports GPTQ's objective (the output error on the calibration inputs,
``tr((W - Q) H (W - Q)^T)``) next to what round-to-nearest would give on the same inputs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moetool.quantize.calibrate import CalibrationRunner, CoverageOptions, ExpertsHessians, LayerCoverage, LinearHessian
from moetool.quantize.gptq import DEFAULT_DAMP, GPTQStats, gptq_quantize
from moetool.quantize.rtn import QuantizedWeight, rtn_quantize

if TYPE_CHECKING:
    import torch

    from moetool.quantize.grids import Grid

METHODS = ("gptq", "rtn", "nf4")


@dataclass(frozen=True)
class MethodOptions:
    """How codes are chosen.

    Attributes:
        method: ``gptq``, ``rtn`` or ``nf4`` (round to nearest on the NF4 code book).
        group_size: input columns per scale (0: per row).
        act_order: GPTQ: columns in order of decreasing Hessian diagonal.
        damp: GPTQ dampening (fraction of the mean Hessian diagonal).
        expert_batch: experts quantized together (0: all of a layer). Smaller bounds GPU memory
            (Hessians are ``experts x columns^2``) at the cost of extra passes over the layer.
        ternary_bits: ternary grids: bits per parameter each expert's coded codes and scales must fit
            in (see :func:`quantize_ternary_to_rate`); 0: the grid's own scale.
        split_gate_up: the checkpoint stores each expert's gate and up as two tensors (per-expert
            layout), so their ternary codes are two streams.
    """

    method: str = "gptq"
    group_size: int = 128
    act_order: bool = True
    damp: float = DEFAULT_DAMP
    expert_batch: int = 0
    ternary_bits: float = 0.0
    split_gate_up: bool = True


@dataclass
class LayerReport:
    """What quantizing one layer did.

    Attributes:
        layer: decoder layer index.
        seconds: wall time for the layer (calibration passes included).
        coverage: per-expert calibration (GPTQ only).
        proxy_error: per quantized weight (``gate_up``, ``down``, linear module names): GPTQ's output
            error on the calibration inputs and round-to-nearest's on the same inputs (GPTQ only).
    """

    layer: int
    seconds: float = 0.0
    coverage: LayerCoverage | None = None
    proxy_error: dict[str, dict[str, float]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "seconds": round(self.seconds, 3),
            "proxy_error": {k: {m: float(f"{v:.6g}") for m, v in d.items()} for k, d in self.proxy_error.items()},
        }


@dataclass
class LayerResult:
    """Quantized weights of one layer: ``experts`` as ``(gate_up [E, 2I, H], down [E, H, I])``."""

    report: LayerReport
    experts: tuple[QuantizedWeight, QuantizedWeight] | None = None
    linears: dict[str, QuantizedWeight] = field(default_factory=dict)


def _proxy(weight: torch.Tensor, quantized: torch.Tensor, hessian: torch.Tensor) -> float:
    import torch

    delta = weight.float() - quantized
    return float(torch.einsum("erc,ecd,erd->", delta, hessian, delta))


#: Scale multiples (of the group's absmax) a ternary expert may get, smallest (most accurate) first.
TERNARY_SCALES = (1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.75, 2.0, 2.5, 3.0, 4.0)


def stored_ternary_bits(codes: torch.Tensor, groups: int, streams: int = 1) -> torch.Tensor:
    """Bits per parameter of each expert's ternary codes as they will be stored: the coded stream(s)
    (encoded for real: the coder's overhead depends on size and skew) plus the float16 scales.

    Args:
        codes: ``[E, rows, columns]`` trits.
        groups: scales per row.
        streams: how many equal row blocks of an expert are stored as separate streams (2 for a
            per-expert gate/up pair).
    """
    import torch

    from moetool.quantize.codec import encode_trits

    e, rows, columns = codes.shape
    cpu = codes.cpu()
    step = rows // streams
    out = []
    for expert in range(e):
        stored = sum(len(encode_trits(cpu[expert, r : r + step])) for r in range(0, rows, step))
        out.append((8 * stored + 16 * groups * rows) / (rows * columns))
    return torch.tensor(out)


def quantize_ternary_to_rate(
    weight: torch.Tensor,
    hessian: torch.Tensor | None,
    opts: MethodOptions,
    stats: GPTQStats | None = None,
    streams: int = 1,
) -> QuantizedWeight:
    """Ternary codes whose stored size fits ``opts.ternary_bits`` per parameter, expert by expert.

    A larger scale (a multiple of the group's absmax) sends more weights to 0, which the entropy coder
    stores in less space; GPTQ's error feedback pushes the weights it has not quantized yet up, so
    under GPTQ the scale must grow further than under round-to-nearest for the same size. Each expert
    gets the smallest multiple in :data:`TERNARY_SCALES` whose coded size fits (the largest when none
    does), found by a binary search run for all experts at once: every round quantizes every expert
    (one batched GPTQ call, each expert with its own multiple) and codes the result to measure it.
    """
    import torch

    from moetool.quantize.grids import TernaryGrid, group_bounds

    e = weight.shape[0]
    device = weight.device
    groups = len(group_bounds(weight.shape[-1], opts.group_size))
    factors = torch.tensor(TERNARY_SCALES, dtype=torch.float32, device=device)

    def trial(index: torch.Tensor) -> tuple[QuantizedWeight, torch.Tensor, list[float]]:
        grid = TernaryGrid(scale_factor=factors[index][:, None])  # one multiple per expert
        trial_stats = GPTQStats()
        if hessian is None:
            q = rtn_quantize(weight, grid, opts.group_size)
        else:
            q = gptq_quantize(
                weight, hessian, grid, opts.group_size, act_order=opts.act_order, damp=opts.damp, stats=trial_stats
            )
        return q, stored_ternary_bits(q.codes, groups, streams).to(device), trial_stats.proxy_error or [0.0] * e

    # The largest multiple first: what an expert gets when nothing smaller fits.
    top = torch.full((e,), len(TERNARY_SCALES) - 1, device=device)
    best, _, proxy = trial(top)
    best_index = top.clone()
    lo = torch.zeros(e, dtype=torch.long, device=device)
    hi = top.clone()
    while bool((lo < hi).any()):
        mid = torch.where(lo < hi, (lo + hi) // 2, best_index)
        q, bits, trial_proxy = trial(mid)
        fits = bits <= opts.ternary_bits
        active = lo < hi
        better = active & fits & (mid < best_index)
        for name in ("codes", "scale", "dequantized"):
            getattr(best, name)[better] = getattr(q, name)[better]
        for index in better.nonzero().flatten().tolist():
            proxy[index] = trial_proxy[index]
        best_index = torch.where(better, mid, best_index)
        hi = torch.where(active & fits, mid, hi)
        lo = torch.where(active & ~fits, mid + 1, lo)
    if stats is not None:
        stats.proxy_error = proxy
    return best


def _gptq(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    opts: MethodOptions,
    report: LayerReport,
    key: str,
) -> QuantizedWeight:
    stats = GPTQStats()
    if grid.kind == "ternary" and opts.ternary_bits:
        streams = 2 if key == "gate_up" and opts.split_gate_up else 1
        result = quantize_ternary_to_rate(weight, hessian, opts, stats, streams)
        baseline = quantize_ternary_to_rate(weight, None, opts, streams=streams)
    else:
        result = gptq_quantize(
            weight, hessian, grid, opts.group_size, act_order=opts.act_order, damp=opts.damp, stats=stats
        )
        baseline = rtn_quantize(weight, grid, opts.group_size)
    figures = report.proxy_error.setdefault(key, {"gptq": 0.0, "rtn": 0.0})
    figures["gptq"] += sum(stats.proxy_error)
    figures["rtn"] += _proxy(weight, baseline.dequantized, hessian)
    return result


def _rtn(weight: torch.Tensor, grid: Grid, opts: MethodOptions, streams: int = 1) -> QuantizedWeight:
    if grid.kind == "ternary" and opts.ternary_bits:
        return quantize_ternary_to_rate(weight, None, opts, streams=streams)
    return rtn_quantize(weight, grid, opts.group_size)


def _concat(parts: list[QuantizedWeight]) -> QuantizedWeight:
    import torch

    if len(parts) == 1:
        return parts[0]
    return QuantizedWeight(
        codes=torch.cat([p.codes for p in parts]),
        scale=torch.cat([p.scale for p in parts]),
        zero=None if parts[0].zero is None else torch.cat([p.zero for p in parts if p.zero is not None]),
        dequantized=None if parts[0].dequantized is None else torch.cat([p.dequantized for p in parts]),
        group_size=parts[0].group_size,
    )


def _write(param: torch.Tensor, value: torch.Tensor, rows: Any = slice(None)) -> None:
    """Put dequantized weights into a parameter in place (``rows`` may be a list: indexed assignment,
    not ``param[rows].copy_``, which would copy into a temporary)."""
    import torch

    with torch.no_grad():
        param[rows] = value.to(device=param.device, dtype=param.dtype)


def quantize_layer(
    layer: int,
    layer_module: Any,
    experts: Any | None,
    linears: dict[str, Any],
    *,
    grid: Grid,
    opts: MethodOptions,
    coverage: CoverageOptions,
    inputs: CalibrationRunner | None,
) -> LayerResult:
    """Quantize one decoder layer in place (the model then holds the dequantized weights).

    Args:
        layer: decoder layer index.
        layer_module: the decoder layer (already on the compute device).
        experts: its transformers experts module, or ``None`` for a layer without routed experts.
        linears: the ``nn.Linear`` modules to quantize, by name relative to the layer.
        grid: the quantization grid.
        opts: method options.
        coverage: calibration coverage options (GPTQ).
        inputs: calibration inputs (GPTQ); the layer's quantized outputs replace them.

    Returns:
        The codes and a report.
    """
    import contextlib

    import torch

    from moetool.quantize.gptq import reproducible_threads

    device = next(layer_module.parameters()).device
    fixed = reproducible_threads(device) if opts.method == "gptq" else contextlib.nullcontext()
    with torch.no_grad(), fixed:
        return _quantize_layer(layer, layer_module, experts, linears, grid, opts, coverage, inputs)


def _quantize_layer(
    layer: int,
    layer_module: Any,
    experts: Any | None,
    linears: dict[str, Any],
    grid: Grid,
    opts: MethodOptions,
    coverage: CoverageOptions,
    inputs: CalibrationRunner | None,
) -> LayerResult:
    started = time.perf_counter()
    report = LayerReport(layer)
    result = LayerResult(report)
    if opts.method == "gptq":
        assert inputs is not None
        _gptq_layer(layer, layer_module, experts, linears, grid, opts, coverage, inputs, result)
    else:
        if experts is not None:
            gate_up = _rtn(experts.gate_up_proj, grid, opts, 2 if opts.split_gate_up else 1)
            down = _rtn(experts.down_proj, grid, opts)
            _write(experts.gate_up_proj, gate_up.dequantized)
            _write(experts.down_proj, down.dequantized)
            result.experts = (gate_up, down)
        for name, module in linears.items():
            weight = _rtn(module.weight[None], grid, opts).select(0)
            _write(module.weight, weight.dequantized)
            result.linears[name] = weight
        if inputs is not None:
            inputs.run(layer, layer_module, keep=True)
    report.seconds = time.perf_counter() - started
    return result


def _chunks(count: int, size: int) -> list[list[int]]:
    size = count if size <= 0 else size
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]


def _gptq_experts(
    layer: int,
    layer_module: Any,
    experts: Any,
    grid: Grid,
    opts: MethodOptions,
    coverage: CoverageOptions,
    inputs: CalibrationRunner,
    result: LayerResult,
) -> None:
    """GPTQ of a layer's routed experts, a chunk of ``opts.expert_batch`` experts at a time.

    One run of the layer records what reaches the experts module (its inputs and the router's choices:
    tokens x hidden, small); every chunk's gate/up and down Hessians are then computed from that record,
    so a chunk costs no further run of the layer and memory holds one chunk's Hessians and GPTQ work.
    """
    report = result.report
    recorder = ExpertsHessians(experts, inputs, coverage, [])
    handle = recorder.collect_gate_up(keep_inputs=True)
    try:
        inputs.run(layer, layer_module, keep=False)
    finally:
        handle.remove()
    recorder.reduce_all_tokens(inputs)
    cached = recorder.cached or []
    gate_up_parts: list[QuantizedWeight] = []
    down_parts: list[QuantizedWeight] = []
    expert_coverage = []
    for chunk in _chunks(int(experts.gate_up_proj.shape[0]), opts.expert_batch):
        hessians = ExpertsHessians(experts, inputs, coverage, chunk)
        hessians.gate_up_from_cache(cached, recorder)
        hessians.reduce_gate_up(inputs)
        hessians.plan_coverage()
        assert hessians.gate_up is not None
        gate_up = _gptq(experts.gate_up_proj[chunk], hessians.gate_up, grid, opts, report, "gate_up")
        _write(experts.gate_up_proj, gate_up.dequantized, chunk)
        hessians.gate_up = None  # free before the down Hessians
        # Down Hessians from the quantized gate/up: what the down projection now really receives.
        hessians.cached = cached
        hessians.down_from_cache()
        hessians.reduce_down(inputs)
        hessians.finish_down()
        assert hessians.down is not None
        down = _gptq(experts.down_proj[chunk], hessians.down, grid, opts, report, "down")
        _write(experts.down_proj, down.dequantized, chunk)
        hessians.down = None
        # The module now holds the dequantized weights; the codes are all the writer needs.
        gate_up_parts.append(dataclasses.replace(gate_up, dequantized=None))
        down_parts.append(dataclasses.replace(down, dequantized=None))
        del gate_up, down
        expert_coverage += hessians.coverage()
    result.experts = (_concat(gate_up_parts), _concat(down_parts))
    report.coverage = LayerCoverage(layer, recorder.all_tokens, expert_coverage)


def _gptq_layer(
    layer: int,
    layer_module: Any,
    experts: Any | None,
    linears: dict[str, Any],
    grid: Grid,
    opts: MethodOptions,
    coverage: CoverageOptions,
    inputs: CalibrationRunner,
    result: LayerResult,
) -> None:
    report = result.report
    # Pass 1: the linears' Hessians (attention, shared experts), quantized first.
    if linears:
        collectors = {name: LinearHessian(module, inputs, module.weight.device) for name, module in linears.items()}
        try:
            inputs.run(layer, layer_module, keep=False)
        finally:
            for collector in collectors.values():
                collector.remove()
        for name, collector in collectors.items():
            collector.reduce(inputs)
            module = linears[name]
            weight = _gptq(module.weight[None], collector.hessian[None], grid, opts, report, name)
            _write(module.weight, weight.dequantized[0])
            result.linears[name] = weight.select(0)
        del collectors
    if experts is not None:
        _gptq_experts(layer, layer_module, experts, grid, opts, coverage, inputs, result)
    # Pass 3: the quantized layer's outputs feed the next layer.
    inputs.run(layer, layer_module, keep=True)
