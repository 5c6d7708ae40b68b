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

Which of the two a layer gets is the method's choice (:mod:`moetool.quantize.methods`): it calls
:func:`gptq_layer` or :func:`rtn_layer` with a :class:`LayerJob`.

Besides the codes, each layer reports GPTQ's objective (the output error on the calibration inputs,
``tr((W - Q) H (W - Q)^T)``) next to what round-to-nearest would give on the same inputs.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moetool.quantize.calibrate import CalibrationRunner, ExpertsHessians, LayerCoverage, LinearHessian
from moetool.quantize.gptq import GPTQStats, gptq_quantize
from moetool.quantize.rtn import QuantizedWeight, rtn_quantize
from moetool.runner.observe import Observer

if TYPE_CHECKING:
    import torch

    from moetool.quantize.grids import Grid
    from moetool.quantize.request import QuantizeOptions


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


@dataclass
class LayerJob:
    """One decoder layer to quantize, and how.

    Attributes:
        layer: decoder layer index.
        module: the decoder layer (already on the compute device).
        experts: its transformers experts module, or ``None`` for a layer without routed experts.
        linears: the ``nn.Linear`` modules to quantize, by name relative to the layer.
        grid: the quantization grid.
        request: the run's settings (method, group size, GPTQ and ternary options, coverage).
        inputs: calibration inputs (GPTQ); the layer's quantized outputs replace them.
        expert_batch: experts quantized together (0: all of a layer), computed by the run from the
            request and the device. Smaller bounds GPU memory (Hessians are ``experts x columns^2``) at
            the cost of extra passes over the layer.
        split_gate_up: the checkpoint stores each expert's gate and up as two tensors (per-expert
            layout), so their ternary codes are two streams.
        routed: the ``linears`` that are routed experts (two-matrix experts stored as ``nn.Linear``
            modules), by name: ``(expert, "up" | "down")``; GPTQ calibrates them on their routed tokens
            (:mod:`moetool.quantize.linear_experts`).
        result: filled by the method.
    """

    layer: int
    module: Any
    experts: Any | None
    linears: dict[str, Any]
    grid: Grid
    request: QuantizeOptions
    inputs: CalibrationRunner | None = None
    expert_batch: int = 0
    split_gate_up: bool = True
    routed: dict[str, tuple[int, str]] = field(default_factory=dict)
    result: LayerResult = field(init=False)

    def __post_init__(self) -> None:
        self.result = LayerResult(LayerReport(self.layer))


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
    opts: QuantizeOptions,
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


def _gptq(job: LayerJob, weight: torch.Tensor, hessian: torch.Tensor, key: str) -> QuantizedWeight:
    opts, grid = job.request, job.grid
    stats = GPTQStats()
    if grid.kind == "ternary" and opts.ternary_bits:
        streams = 2 if key == "gate_up" and job.split_gate_up else 1
        result = quantize_ternary_to_rate(weight, hessian, opts, stats, streams)
        baseline = quantize_ternary_to_rate(weight, None, opts, streams=streams)
    else:
        result = gptq_quantize(
            weight, hessian, grid, opts.group_size, act_order=opts.act_order, damp=opts.damp, stats=stats
        )
        baseline = rtn_quantize(weight, grid, opts.group_size)
    figures = job.result.report.proxy_error.setdefault(key, {"gptq": 0.0, "rtn": 0.0})
    figures["gptq"] += sum(stats.proxy_error)
    figures["rtn"] += _proxy(weight, baseline.dequantized, hessian)
    return result


def _rtn(job: LayerJob, weight: torch.Tensor, streams: int = 1) -> QuantizedWeight:
    if job.grid.kind == "ternary" and job.request.ternary_bits:
        return quantize_ternary_to_rate(weight, None, job.request, streams=streams)
    return rtn_quantize(weight, job.grid, job.request.group_size)


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


def quantize_layer(job: LayerJob) -> LayerResult:
    """Quantize one decoder layer in place with the request's method (the model then holds the
    dequantized weights).

    Returns:
        The codes and a report (``job.result``).
    """
    import torch

    from moetool.quantize.methods import method_named

    method = method_named(job.request.method)
    device = next(job.module.parameters()).device
    started = time.perf_counter()
    with torch.no_grad(), method.fixed_threads(device):
        method.quantize_layer(job)
    job.result.report.seconds = time.perf_counter() - started
    return job.result


def rtn_layer(job: LayerJob) -> None:
    """Round to nearest on every weight of the layer (no data); the calibration inputs, if any, move on."""
    experts, result = job.experts, job.result
    if experts is not None:
        gate_up = _rtn(job, experts.gate_up_proj, 2 if job.split_gate_up else 1)
        down = _rtn(job, experts.down_proj)
        _write(experts.gate_up_proj, gate_up.dequantized)
        _write(experts.down_proj, down.dequantized)
        result.experts = (gate_up, down)
    for name, module in job.linears.items():
        weight = _rtn(job, module.weight[None]).select(0)
        _write(module.weight, weight.dequantized)
        result.linears[name] = weight
    if job.inputs is not None:
        job.inputs.run(job.layer, job.module, keep=True)


def _chunks(count: int, size: int) -> list[list[int]]:
    size = count if size <= 0 else size
    return [list(range(start, min(start + size, count))) for start in range(0, count, size)]


def _gptq_experts(job: LayerJob, inputs: CalibrationRunner) -> None:
    """GPTQ of a layer's routed experts, a chunk of ``job.expert_batch`` experts at a time.

    One run of the layer records what reaches the experts module (its inputs and the router's choices:
    tokens x hidden, small); every chunk's gate/up and down Hessians are then computed from that record,
    so a chunk costs no further run of the layer and memory holds one chunk's Hessians and GPTQ work.
    """
    experts, result, coverage = job.experts, job.result, job.request.coverage
    assert experts is not None
    recorder = ExpertsHessians(experts, coverage, [])
    observer = Observer(mask=lambda: inputs.current_mask)
    with observer.on_input({job.layer: experts}, recorder.collect_gate_up(keep_inputs=True)).watching():
        inputs.run(job.layer, job.module, keep=False)
    recorder.reduce_all_tokens(inputs)
    cached = recorder.cached or []
    gate_up_parts: list[QuantizedWeight] = []
    down_parts: list[QuantizedWeight] = []
    expert_coverage = []
    for chunk in _chunks(int(experts.gate_up_proj.shape[0]), job.expert_batch):
        hessians = ExpertsHessians(experts, coverage, chunk)
        hessians.gate_up_from_cache(cached, recorder)
        hessians.reduce_gate_up(inputs)
        hessians.plan_coverage()
        assert hessians.gate_up is not None
        gate_up = _gptq(job, experts.gate_up_proj[chunk], hessians.gate_up, "gate_up")
        _write(experts.gate_up_proj, gate_up.dequantized, chunk)
        hessians.gate_up = None  # free before the down Hessians
        # Down Hessians from the quantized gate/up: what the down projection now really receives.
        hessians.cached = cached
        hessians.down_from_cache()
        hessians.reduce_down(inputs)
        hessians.finish_down()
        assert hessians.down is not None
        down = _gptq(job, experts.down_proj[chunk], hessians.down, "down")
        _write(experts.down_proj, down.dequantized, chunk)
        hessians.down = None
        # The module now holds the dequantized weights; the codes are all the writer needs.
        gate_up_parts.append(dataclasses.replace(gate_up, dequantized=None))
        down_parts.append(dataclasses.replace(down, dequantized=None))
        del gate_up, down
        expert_coverage += hessians.coverage()
    result.experts = (_concat(gate_up_parts), _concat(down_parts))
    result.report.coverage = LayerCoverage(job.layer, recorder.all_tokens, expert_coverage)


def gptq_layer(job: LayerJob) -> None:
    """GPTQ of the layer: its linears first, then its experts (true-sequential), then the quantized
    layer's outputs feed the next layer."""
    inputs = job.inputs
    assert inputs is not None
    # Pass 1: the linears' Hessians (attention, shared experts), quantized first.
    linears = {name: module for name, module in job.linears.items() if name not in job.routed}
    if linears:
        collectors = {name: LinearHessian(module, module.weight.device) for name, module in linears.items()}
        observer = Observer(mask=lambda: inputs.current_mask)
        for name, collector in collectors.items():
            observer.on_input({name: linears[name]}, collector.add)
        with observer.watching():
            inputs.run(job.layer, job.module, keep=False)
        for name, collector in collectors.items():
            collector.reduce(inputs)
            module = job.linears[name]
            weight = _gptq(job, module.weight[None], collector.hessian[None], name)
            _write(module.weight, weight.dequantized[0])
            job.result.linears[name] = weight.select(0)
        del collectors
    if job.routed:
        from moetool.quantize.linear_experts import gptq_linear_experts

        gptq_linear_experts(job, inputs)
    if job.experts is not None:
        _gptq_experts(job, inputs)
    # Pass 3: the quantized layer's outputs feed the next layer.
    inputs.run(job.layer, job.module, keep=True)
