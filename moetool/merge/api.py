"""``merge``: N routed experts to M per MoE layer, or all of them into one dense FFN.

The flow (:func:`merge` is its outline, one named step per line):

1. ``_check_request`` / ``_open_source`` / ``_plan`` / ``_check_output``: check the options, open the
   checkpoint (headers only), check the family, and plan the output: config and every output tensor
   with its shape and dtype, so the output size is known exactly before anything runs and the output
   path is checked before any compute;
2. ``_run_calibration``: one pass of ``calibration`` text through the model (the only time the source
   model is built before evaluation), or read a profile-routing stats file;
3. ``_stream_layers``: one layer at a time, read its tensors from the checkpoint, decide which experts
   are kept or merged, combine them, write; every other tensor is copied unchanged. Output goes through
   a staging folder published atomically (nothing is left behind on an error or Ctrl-C);
4. ``_evaluate_output``: optionally evaluate the output against the source on held-out text (perplexity
   before and after, KL and top-1 next-token agreement); ``_result`` / ``_write_card`` record
   everything in the result and the model card.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.arch.dims import Dims, get_path, resolve_dims
from moetool.arch.registry import family_for_config, require_capability
from moetool.arch.spec import FamilySpec, MergeTraits, Routing
from moetool.errors import ConfigError, DatasetError, MoetoolError, UnsupportedArchitectureError, UsageError
from moetool.io.dtypes import FLOAT_DTYPES, dtype_name, torch_dtype
from moetool.io.jsonfile import json_number
from moetool.io.shards import WriteResult
from moetool.io.sizes import DEFAULT_MAX_SHARD_SIZE
from moetool.merge.calibrate import DEFAULT_SAMPLE_TOKENS, Calibration, LayerCalibration
from moetool.merge.ffn import FFN
from moetool.merge.layout import Experts, LayerTensors, find_prefix
from moetool.merge.methods import MERGE, PRUNE, LayerInputs, output_similarity
from moetool.merge.methods import METHODS as METHOD_TABLE
from moetool.merge.plan import (
    LayerDecision,
    OutputTensor,
    check_against_registry,
    dense_config,
    dense_target,
    merge_traits,
    output_tensors,
    reduced_config,
)
from moetool.progress import LAYERS, Progress, token_counter

if TYPE_CHECKING:
    import torch

    from moetool.data import DatasetSpec, Document
    from moetool.io.checkpoint import Checkpoint
    from moetool.merge.router import RoutingRule
    from moetool.routing.stats import RoutingStats

SCHEMA_VERSION = 1

# The method registry is moetool.merge.methods; these are views of it.
PRUNING_METHODS = tuple(name for name, method in METHOD_TABLE.items() if method.kind == PRUNE)
MERGING_METHODS = tuple(name for name, method in METHOD_TABLE.items() if method.kind == MERGE)
METHODS = PRUNING_METHODS + MERGING_METHODS
DENSE_STRATEGIES = ("top1", "average", "concat")
ALIGN_MODES = ("weights", "activations", "none")
# Chosen by measurement on the trained example (docs/merge-results.md): search loses least at 8 -> 4 and
# beats frequency pruning at 8 -> 2. It needs calibration hidden states and a routing rule moetool can
# model; without them (a stats file, or Llama-4's input-scaling router) the default is frequency.
DEFAULT_METHOD = "search"
FALLBACK_METHOD = "frequency"
DEFAULT_DENSE_STRATEGY = "concat"

# Methods that need calibration hidden states (a --dataset pass, not a stats file).
NEEDS_SAMPLE = {name for name, method in METHOD_TABLE.items() if method.needs_sample}


@dataclass
class EvalFigures:
    """Quality of the output against the source on held-out text."""

    dataset: str
    tokens: int
    perplexity_before: float
    perplexity_after: float
    kl: float
    top1_agreement: float
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset,
            "tokens": self.tokens,
            "perplexity_before": json_number(self.perplexity_before),
            "perplexity_after": json_number(self.perplexity_after),
            "kl": json_number(self.kl),
            "top1_agreement": json_number(self.top1_agreement),
            "seconds": round(self.seconds, 3),
        }


@dataclass
class MergeResult:
    """What :func:`merge` did (``to_json`` is the ``--json`` document, schema_version 1)."""

    model: str
    output: str
    revision: str | None
    family: str
    model_type: str | None
    output_model_type: str | None
    mode: str  # "experts" or "dense"
    method: str | None
    dense_strategy: str | None
    align: str
    refit_router: bool
    refit_down: bool
    num_experts_before: int
    num_experts_after: int
    top_k_before: int
    top_k_after: int
    intermediate_size: int | None
    config_changes: dict[str, list[Any]]
    adjustments: list[str]
    calibration: dict[str, Any]
    layers: list[LayerDecision]
    source_bytes: int
    predicted_bytes: int
    written_bytes: int
    source_params: int
    output_params: int
    files: list[str]
    eval: EvalFigures | None = None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "revision": self.revision,
            "output": self.output,
            "family": self.family,
            "model_type": self.model_type,
            "output_model_type": self.output_model_type,
            "mode": self.mode,
            "method": self.method,
            "dense_strategy": self.dense_strategy,
            "align": self.align,
            "refit_router": self.refit_router,
            "refit_down": self.refit_down,
            "num_experts_before": self.num_experts_before,
            "num_experts_after": self.num_experts_after,
            "top_k_before": self.top_k_before,
            "top_k_after": self.top_k_after,
            "intermediate_size": self.intermediate_size,
            "config_changes": self.config_changes,
            "adjustments": self.adjustments,
            "calibration": self.calibration,
            "layers": [layer.to_json() for layer in self.layers],
            "size": {
                "source_bytes": self.source_bytes,
                "predicted_bytes": self.predicted_bytes,
                "written_bytes": self.written_bytes,
                "source_params": self.source_params,
                "output_params": self.output_params,
            },
            "files": self.files,
            "eval": None if self.eval is None else self.eval.to_json(),
            "timings": {k: round(v, 3) for k, v in self.timings.items()},
            "warnings": self.warnings,
        }


# ----------------------------------------------------------------------------- the writer adapter


def open_writer(folder: Path, planned: Sequence[OutputTensor], *, max_shard_size: int) -> Any:
    """The sharded writer merge writes through: every output tensor is known up front, so shard headers
    are written first and tensor bytes stream straight to disk (nothing buffered).

    It takes the tensors in plan order, each checked against its entry (name, dtype, shape).
    """
    from moetool.io.shards import PlannedEntry, ShardWriter

    entries = [PlannedEntry(t.name, t.dtype, t.shape) for t in planned]
    return ShardWriter(folder, entries, max_shard_size=max_shard_size)


# ----------------------------------------------------------------------------- helpers


def _routing_renormalises(spec: FamilySpec, config: dict[str, Any]) -> bool:
    key = spec.routing.renormalize_key
    if key is None:
        return spec.routing.renormalize_default
    value = get_path(config, key)
    if not isinstance(value, (bool, int, float)):  # absent or null: the family's default
        return spec.routing.renormalize_default
    return bool(value)


def _scaling(spec: FamilySpec, config: dict[str, Any]) -> float:
    key = spec.routing.scaling_key
    value = get_path(config, key) if key else None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 1.0


def check_options(
    *,
    num_experts: int | None,
    to_dense: bool,
    method: str | None,
    dense_strategy: str,
    intermediate_size: int | None,
    have_data: bool,
    have_stats: bool,
    refit_router: bool,
    refit_down: bool | None = None,
    align: str = "weights",
) -> None:
    if align not in ALIGN_MODES:
        raise UsageError(f"unknown --align {align!r}", hint=f"choose one of {', '.join(ALIGN_MODES)}")
    if to_dense == (num_experts is not None):
        raise UsageError(
            "give exactly one of --num-experts M and --to-dense",
            hint="--num-experts 4 keeps an MoE with 4 experts per layer; --to-dense writes a dense model",
        )
    if have_data == have_stats:
        raise UsageError(
            "give exactly one of --dataset (calibration text) and --stats (a profile-routing stats file)",
            hint="merging needs to know how the router uses the experts",
            code="CALIBRATION_MISSING" if not have_data else "USAGE",
        )
    if to_dense:
        if dense_strategy not in DENSE_STRATEGIES:
            raise UsageError(
                f"unknown --dense-strategy {dense_strategy!r}", hint=f"choose one of {', '.join(DENSE_STRATEGIES)}"
            )
        if intermediate_size is not None and dense_strategy != "concat":
            raise UsageError(
                f"--intermediate-size applies to --dense-strategy concat, not {dense_strategy}",
                hint="top1 and average keep the experts' width",
            )
        if refit_router:
            raise UsageError("--refit-router has no router to refit with --to-dense")
        if refit_down and have_stats:
            raise UsageError(
                "--refit-down needs calibration hidden states, which a stats file does not hold",
                hint="pass --dataset instead of --stats",
                code="NEEDS_DATASET",
            )
    elif method is not None and method not in METHODS:
        raise UsageError(f"unknown --method {method!r}", hint=f"choose one of {', '.join(METHODS)}")
    if not to_dense:
        if intermediate_size is not None:
            raise UsageError("--intermediate-size applies to --to-dense --dense-strategy concat")
        if refit_down:
            raise UsageError("--refit-down applies to --to-dense")
        if have_stats and (method in NEEDS_SAMPLE or refit_router):
            what = f"--method {method}" if method in NEEDS_SAMPLE else "--refit-router"
            raise UsageError(
                f"{what} needs calibration hidden states, which a stats file does not hold",
                hint="pass --dataset instead of --stats",
                code="NEEDS_DATASET",
            )


class _Counting:
    """Wraps a document sequence and counts how many were taken (to evaluate on the rest)."""

    def __init__(self, documents: Iterable[Document]) -> None:
        self.documents = documents
        self.taken = 0

    def __iter__(self) -> Iterator[Document]:
        for document in self.documents:
            self.taken += 1
            yield document


# ----------------------------------------------------------------------------- per-layer decisions


def _needs_sample(method: str, to_dense: bool, refit_router: bool, align: str) -> bool:
    """Whether the layers' calibration hidden states are used: a pruning method that needs none (it
    decides from counts) without a refit or an activation alignment keeps no per-layer sample (tokens x
    hidden, for every layer at once); merging methods use one when there is one."""
    chosen = METHOD_TABLE[method]
    return to_dense or refit_router or align == "activations" or chosen.kind == MERGE or chosen.needs_sample


def _decide(
    method: str,
    m: int,
    inputs: LayerInputs,
    traits: MergeTraits,
    rule: RoutingRule | None,
    *,
    need_assignment: bool = True,
) -> tuple[LayerDecision, list[int]]:
    """Groups for one layer (the method's choice, :mod:`moetool.merge.methods`), and the refit assignment
    (old expert -> new expert).

    ``need_assignment=False`` (no routing refit follows) skips what only the assignment of a pruning
    needs: every expert's outputs on the calibration sample, the largest temporary of a layer.
    """
    from moetool.merge.grouping import row_similarity, weights_within

    chosen = METHOD_TABLE[method]
    cal = inputs.calibration
    n = inputs.experts.num_experts
    if chosen.kind == PRUNE:
        assert chosen.select is not None
        kept, importance, notes = chosen.select(inputs, m, traits, rule)
        groups = [[e] for e in kept]
        weights = [[1.0] for _ in kept]
        dropped = [e for e in range(n) if e not in kept]
        assignment = [0] * n
        for j, e in enumerate(kept):
            assignment[e] = j
        if not need_assignment:
            return LayerDecision(inputs.layer, groups, weights, dropped, importance, notes), assignment
        # For a refit, a dropped expert's tokens go to the kept expert that computes most like it.
        similarity = output_similarity(inputs) if cal.sample is not None else row_similarity(inputs.router[0])
        for e in dropped:
            assignment[e] = max(range(len(kept)), key=lambda j: (float(similarity[e, kept[j]]), -j))
        return LayerDecision(inputs.layer, groups, weights, dropped, importance, notes), assignment
    assert chosen.group is not None
    freq = [float(c) for c in cal.counts]
    groups = chosen.group(inputs, m, traits)
    weights = weights_within(groups, freq)
    assignment = [0] * n
    for j, members in enumerate(groups):
        for e in members:
            assignment[e] = j
    return LayerDecision(inputs.layer, groups, weights, [], freq), assignment


# Calibration tokens used to match neurons by their activations.
_ALIGN_TOKENS = 2048


def _align_tokens(align: str, inputs: LayerInputs) -> dict[str, Any]:
    sample = inputs.calibration.sample
    if align != "activations" or sample is None:
        return {}
    return {"tokens": sample.x[:_ALIGN_TOKENS].float(), "act": inputs.act}


def _reduce_layer(
    method: str,
    m: int,
    inputs: LayerInputs,
    traits: MergeTraits,
    *,
    align: str,
    refit_router: bool,
    sigmoid_router: bool,
    rule: RoutingRule | None,
) -> tuple[LayerDecision, Experts, list[torch.Tensor]]:
    from moetool.merge.combine import merge_experts
    from moetool.merge.router import merge_rows, refit, select_rows

    decision, assignment = _decide(method, m, inputs, traits, rule, need_assignment=refit_router and rule is None)
    if method in PRUNING_METHODS:
        kept = [g[0] for g in decision.groups]
        experts = inputs.experts.select(kept)
        router = [select_rows(t, kept) for t in inputs.router]
    else:
        experts = merge_experts(
            inputs.experts, decision.groups, decision.weights, align=align != "none", **_align_tokens(align, inputs)
        )
        router = [merge_rows(t, decision.groups, decision.weights) for t in inputs.router]
        decision.notes["aligned"] = align
    if refit_router:
        sample = inputs.calibration.sample
        assert sample is not None
        if rule is not None:
            router[0], losses = _refit_outputs(inputs, experts, router, rule, traits)
            losses["objective"] = "layer output"
        else:  # the weight scales the expert's input: fit the routing distribution instead
            router[0], losses = refit(sample.x, sample.logits, assignment, router[0], sigmoid=sigmoid_router)
            losses["objective"] = "routing cross-entropy"
        decision.notes["router_refit"] = {k: round(v, 6) if isinstance(v, float) else v for k, v in losses.items()}
    return decision, experts, router


# Bound on the floats of the [tokens, M, H] expert outputs a router refit holds (1 GiB).
_REFIT_FLOATS = 2**28


def _refit_outputs(
    inputs: LayerInputs, experts: Experts, router: list[torch.Tensor], rule: RoutingRule, traits: MergeTraits
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Refit the reduced router to reproduce the original layer's routed output (see router.refit_to_outputs)."""
    import dataclasses

    import torch

    from moetool.merge.combine import routed_output
    from moetool.merge.ffn import expert_forward
    from moetool.merge.router import refit_to_outputs

    sample = inputs.calibration.sample
    assert sample is not None
    m, hidden = experts.num_experts, experts.hidden_size
    n = min(sample.size, max(256, _REFIT_FLOATS // max(m * hidden, 1)))
    x = sample.x[:n].float()
    target = routed_output(
        inputs.experts, x, sample.indices[:n], sample.weights[:n], inputs.act, scales_input=traits.router_scales_input
    )
    outputs = torch.stack([expert_forward(experts, j, x, inputs.act) for j in range(m)], dim=1)
    bias = router[1].float() if len(router) > 1 and rule.kind == "sigmoid" else None
    rule = dataclasses.replace(rule, bias=bias)
    weight, losses = refit_to_outputs(x, outputs, target, router[0], rule)
    return weight, {**losses, "tokens": n}


def _dense_layer(
    strategy: str,
    inputs: LayerInputs,
    *,
    routed_width: int,
    weight_sum: float,
    shared: FFN | None,
    shared_gate: torch.Tensor | None,
    align: str,
    refit_down: bool,
    scales_input: bool,
) -> tuple[LayerDecision, FFN]:
    import torch

    from moetool.merge.combine import concat, dense_average, dense_concat, dense_top1, fit_down, routed_output, scale

    cal = inputs.calibration
    freq = [float(c) for c in cal.counts]
    n = inputs.experts.num_experts
    if strategy == "top1":
        ffn, used = dense_top1(inputs.experts, freq, weight_sum)
        weights = [[weight_sum]]
    elif strategy == "average":
        ffn, used = dense_average(
            inputs.experts, freq, weight_sum, align=align != "none", **_align_tokens(align, inputs)
        )
        total = sum(freq) or 1.0
        weights = [[weight_sum * freq[e] / total for e in used]]
    else:
        if cal.weight_mean is not None:
            coefficients = list(cal.weight_mean)
        else:  # stats file: spread the mean total weight by selection frequency
            total = sum(freq) or 1.0
            coefficients = [weight_sum * f / total for f in freq]
        ffn, used = dense_concat(inputs.experts, coefficients, routed_width, weight_sum)
        kept = sum(coefficients[e] for e in used) or 1.0
        weights = [[weight_sum * coefficients[e] / kept for e in used]]
    notes: dict[str, Any] = {"strategy": strategy, "routing_weight_sum": round(weight_sum, 6)}
    if refit_down:
        sample = cal.sample
        assert sample is not None
        target = routed_output(
            inputs.experts, sample.x, sample.indices, sample.weights, inputs.act, scales_input=scales_input
        )
        ffn, errors = fit_down(ffn, sample.x, target, inputs.act)
        notes["down_refit"] = {k: round(v, 6) for k, v in errors.items()}
    if shared is not None:
        factor = 1.0
        if shared_gate is not None:
            sample = cal.sample
            assert sample is not None
            factor = float(torch.sigmoid(sample.x.float() @ shared_gate.float().reshape(-1)).mean())
            notes["shared_expert_gate_mean"] = round(factor, 6)
        ffn = concat([ffn, scale(shared, factor)])
        notes["shared_expert"] = "folded in" + (
            " (sigmoid gate replaced by its calibration mean)" if shared_gate is not None else ""
        )
    dropped = [e for e in range(n) if e not in used]
    return LayerDecision(inputs.layer, [used], weights, dropped, freq, notes), ffn


# ----------------------------------------------------------------------------- the entry point


@dataclass(frozen=True)
class MergeOptions:
    """What ``moetool merge`` does, as one value (the CLI builds it once from the options).

    Attributes:
        num_experts: M, the experts kept per MoE layer (``1 <= M < N``).
        to_dense: write the family's dense architecture instead (one FFN per layer).
        method: ``frequency``, ``soft-frequency``, ``reap``, ``search`` (pruning) or ``merge-frequency``,
            ``merge-router``, ``merge-output`` (merging), see the module docs. ``None``: ``search`` when
            there is calibration text and the family's routing rule is modelled, else ``frequency``
            (:func:`default_method`).
        dense_strategy: ``top1``, ``average`` or ``concat`` (``to_dense``).
        intermediate_size: the dense FFN width for ``concat`` (default: top-k experts' worth).
        refit_router: fit the new router rows to the old routing on calibration tokens.
        refit_down: ``to_dense``: refit the dense FFN's down projection by least squares to what the
            routed experts output on the calibration tokens (``None``: whenever there are calibration
            hidden states, i.e. with calibration text).
        align: how neurons are matched before experts are averaged: ``weights`` (by their gate, up and
            down weights), ``activations`` (by their activations on calibration tokens) or ``none``.
        sample_tokens: calibration tokens kept per layer for REAP, similarities, refits.
        seed: seeds the token sample.
        evaluate: measure the output against the source when there is text to do it on.
        eval_max_tokens: evaluation tokens (None: all).
        device / dtype: where and in what precision the model runs (calibration and evaluation).
        whole_model: load the model whole for calibration and evaluation instead of streaming it one
            decoder layer at a time.
        max_shard_size: bound on the bytes per output shard.
    """

    num_experts: int | None = None
    to_dense: bool = False
    method: str | None = None
    dense_strategy: str = DEFAULT_DENSE_STRATEGY
    intermediate_size: int | None = None
    refit_router: bool = False
    refit_down: bool | None = None
    align: str = "weights"
    sample_tokens: int = DEFAULT_SAMPLE_TOKENS
    seed: int = 0
    evaluate: bool = True
    eval_max_tokens: int | None = 20_000
    device: str = "auto"
    dtype: str = "auto"
    whole_model: bool = False
    max_shard_size: int = DEFAULT_MAX_SHARD_SIZE

    def check(self, *, have_data: bool, have_stats: bool) -> None:
        """Refuse options that do not fit together (before anything is read).

        Raises:
            UsageError: see :func:`check_options`; a bad device or dtype name; a shard size below 1.
        """
        from moetool.modeling import check_device_name, check_dtype_name

        check_device_name(self.device)
        check_dtype_name(self.dtype)
        if self.max_shard_size < 1:
            raise UsageError(f"max_shard_size must be positive, not {self.max_shard_size}")
        check_options(
            num_experts=self.num_experts,
            to_dense=self.to_dense,
            method=self.method,
            dense_strategy=self.dense_strategy,
            intermediate_size=self.intermediate_size,
            have_data=have_data,
            have_stats=have_stats,
            refit_router=self.refit_router,
            refit_down=self.refit_down,
            align=self.align,
        )


def merge(
    model: str,
    out: str | Path,
    options: MergeOptions,
    *,
    calibration: DatasetSpec | None = None,
    stats: str | Path | RoutingStats | None = None,
    eval_data: DatasetSpec | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    offline: bool | None = None,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    command: str | Sequence[str] | None = None,
    progress: Progress | None = None,
) -> MergeResult:
    """Reduce an MoE checkpoint to ``options.num_experts`` experts per MoE layer, or to a dense model.

    Args:
        model: a local checkpoint folder or Hub repo id.
        out: the output folder (must not exist or be empty, unless ``overwrite``).
        options: what to do (:class:`MergeOptions`).
        calibration: the calibration text, run through the model once (its ``max_tokens``, ``seq_len`` and
            ``batch_size`` set the calibration windows; evaluation uses the same windows).
        stats: a profile-routing stats file (or its loaded :class:`RoutingStats`) instead of
            ``calibration``; methods that need hidden states refuse it.
        eval_data: held-out text; default: the calibration documents the calibration pass did not read.
            Evaluation reads ``options.eval_max_tokens`` tokens of it.
        revision / token / offline: Hub access for ``model``.
        overwrite: replace an existing output folder (still staged and swapped).
        allow_nonfinite: process an input holding NaN/Inf (refused otherwise) and publish such an output.
        command: the command line, for the model card.
        progress: reports ``calibrating`` and ``evaluating`` in tokens, ``writing`` in layers (:mod:`moetool.progress`).

    Returns:
        The result; the output folder is complete and published.

    Raises:
        UsageError: options that do not fit (exit 2).
        UnsupportedArchitectureError: ``NOT_MOE``, an unsupported family, ``NO_DENSE_COUNTERPART``.
        OutputError: the output path overlaps the input, exists, or is a symlink.
        MoetoolError: whatever reading the checkpoint, loading the model or the data raises.
    """
    from moetool.io.writer import staged_output

    started = time.perf_counter()
    timings: dict[str, float] = {}
    hub = {"revision": revision, "token": token, "offline": offline}
    out_path = Path(out)
    # Cheap checks first: a typo should not cost a dataset read or a model load.
    texts = _check_request(
        model, out_path, options, calibration, stats, eval_data, revision=revision, overwrite=overwrite
    )
    source = _open_source(model, options, hub=hub, allow_nonfinite=allow_nonfinite)
    plan = _plan(source, options, have_stats=stats is not None, have_calibration=calibration is not None)
    inputs = _check_output(source, plan, out_path, overwrite=overwrite)

    t0 = time.perf_counter()
    cal, counted = _run_calibration(source, plan, options, texts, stats, progress=progress)
    timings["calibration_s"] = time.perf_counter() - t0

    with staged_output(out_path, inputs=inputs, overwrite=overwrite, allow_nonfinite=allow_nonfinite) as staging:
        t0 = time.perf_counter()
        decisions, files = _stream_layers(source, plan, cal, staging, options, progress=progress)
        timings["write_s"] = time.perf_counter() - t0
        figures = _evaluate_output(source, staging, options, texts, counted, plan.warnings, progress=progress)
        if figures is not None:
            timings["eval_s"] = figures.seconds
        result = _result(model, out_path, source, plan, options, cal, decisions, files, figures)
        _write_card(staging, result, model, out, command, source, plan, options, texts)
    timings["total_s"] = time.perf_counter() - started
    result.timings = timings
    if result.written_bytes != plan.predicted_bytes:  # the writer and the plan count the same tensors
        raise MoetoolError(
            f"internal check failed: wrote {result.written_bytes} bytes, predicted {plan.predicted_bytes}",
            code="MERGE_PLAN_MISMATCH",
        )
    return result


# ----------------------------------------------------------------------------- steps of merge()


@dataclass(frozen=True)
class _Texts:
    """The calibration and evaluation text, loaded once, and the windows both passes cut it into."""

    calibration: list[Document] | None
    evaluation: list[Document] | None
    calibration_name: str
    eval_name: str
    max_tokens: int | None
    seq_len: int
    batch_size: int


@dataclass(frozen=True)
class _Source:
    """The input checkpoint (headers only), checked, and what the registry says about it."""

    checkpoint: Checkpoint
    config: dict[str, Any]
    spec: FamilySpec
    traits: MergeTraits
    dims: Dims
    moe_layers: list[int]
    n: int
    top_k: int
    prefix: str
    layout: LayerTensors
    expert_dtype: str


@dataclass
class _Plan:
    """Everything decided before any compute: the method, the output config and every output tensor."""

    method: str
    refit_down: bool
    dense_spec: FamilySpec | None
    out_spec: FamilySpec
    m: int
    new_top_k: int
    new_config: dict[str, Any]
    changes: dict[str, list[Any]]
    routed_width: int | None
    dense_width: int | None
    shared_widths: dict[int, int]
    tensors: list[OutputTensor]
    sources: dict[int | None, list[str]]
    zeros: list[OutputTensor]
    predicted_bytes: int
    act: Callable
    sigmoid_router: bool
    renormalises: bool
    scaling: float
    rule: RoutingRule | None
    adjustments: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def _check_request(
    model: str,
    out_path: Path,
    options: MergeOptions,
    calibration: DatasetSpec | None,
    stats: Any,
    eval_data: DatasetSpec | None,
    *,
    revision: str | None,
    overwrite: bool,
) -> _Texts:
    """Check the options, the data specs and the output path, then load the text (no model, no weights)."""
    from moetool.data import DatasetSpec
    from moetool.io.source import parse_model_ref
    from moetool.io.writer import check_output_path

    options.check(have_data=calibration is not None, have_stats=stats is not None)
    for data in (calibration, eval_data):
        if data is not None:
            data.check()
    local = parse_model_ref(model, revision=revision).local_path
    check_output_path(out_path, [local] if local is not None else [], overwrite=overwrite)
    calibration_docs = calibration.load() if calibration is not None else None
    eval_documents = eval_data.load() if eval_data is not None else None
    windows = calibration or eval_data or DatasetSpec("")
    return _Texts(
        calibration=calibration_docs,
        evaluation=eval_documents,
        calibration_name=calibration.dataset if calibration is not None else "",
        eval_name=eval_data.dataset if eval_data is not None else "",
        max_tokens=calibration.max_tokens if calibration is not None else None,
        seq_len=windows.seq_len,
        batch_size=windows.batch_size,
    )


def _open_source(model: str, options: MergeOptions, *, hub: dict[str, Any], allow_nonfinite: bool) -> _Source:
    """Open the checkpoint's headers and refuse what merge cannot read (family, quantized or missing experts)."""
    from moetool.modeling import open_checkpoint, quant_method_of
    from moetool.validate import check_input

    checkpoint = open_checkpoint(model, **hub)
    check_input(checkpoint, float_weights=True, allow_nonfinite=allow_nonfinite)
    config = checkpoint.config
    spec = family_for_config(config)
    require_capability(spec, "merge")
    traits = merge_traits(spec)
    if quant_method_of(config):
        raise MoetoolError(
            f"{model} is quantized ({quant_method_of(config)}); merge reads float weights",
            hint="merge the unquantized checkpoint, then quantize the result",
            code="QUANTIZED_INPUT",
        )
    dims = resolve_dims(spec, config)
    moe_layers = sorted(dims.moe_layers)
    if not moe_layers:
        raise UnsupportedArchitectureError(
            f"{model} has no MoE layer (its config makes every layer dense)", code="NOT_MOE"
        )
    n = int(dims.values["E"])
    top_k = _top_k_of(spec, dims)
    num_experts = options.num_experts
    if num_experts is not None and not 1 <= num_experts < n:
        raise UsageError(
            f"--num-experts {num_experts}: the model has {n} experts per MoE layer; choose 1 to {n - 1}",
            hint="--to-dense writes one dense FFN per layer instead",
            code="M_OUT_OF_RANGE",
        )
    prefix = find_prefix(spec, checkpoint.tensors, moe_layers[0], dims)
    layout = LayerTensors(spec, dims, prefix=prefix)
    first_expert = layout.expert_names(moe_layers[0], n)[0]
    if first_expert not in checkpoint.tensors:
        raise MoetoolError(
            f"{model} does not store {first_expert}, where the {spec.name} registry entry expects routed experts",
            hint="the checkpoint is incomplete, or uses a layout moetool does not know",
            code="EXPERT_MISSING",
        )
    expert_dtype = checkpoint.tensors[first_expert].dtype
    if expert_dtype not in FLOAT_DTYPES:
        raise MoetoolError(
            f"the experts of {model} are stored as {expert_dtype}; merge reads float32, float16 or bfloat16",
            hint="dequantize the checkpoint first",
            code="UNSUPPORTED_DTYPE",
        )
    return _Source(checkpoint, config, spec, traits, dims, moe_layers, n, top_k, prefix, layout, expert_dtype)


def _plan(source: _Source, options: MergeOptions, *, have_stats: bool, have_calibration: bool) -> _Plan:
    """Decide the method, the output config and every output tensor, checked against the registry."""
    src = source
    spec, traits, config = src.spec, src.traits, src.config
    method = options.method
    if method is None:
        method = default_method(spec, traits, have_stats=have_stats)
    refit_down = options.refit_down
    if refit_down is None:
        refit_down = options.to_dense and have_calibration
    dense_spec = dense_target(spec) if options.to_dense else None
    adjustments: list[str] = []
    warnings: list[str] = []
    dense_width = routed_width = None
    shared_widths: dict[int, int] = {}
    if dense_spec is not None:
        routed_width, dense_width, shared_widths, width_notes = _dense_widths(
            src.checkpoint,
            spec,
            src.dims,
            src.layout,
            options.dense_strategy,
            options.intermediate_size,
            src.top_k,
            src.n,
        )
        adjustments += width_notes
        new_config, changes = dense_config(config, spec, dense_spec, dense_width)
        out_spec = dense_spec
        m = 1
        new_top_k = 1
    else:
        assert options.num_experts is not None
        m = options.num_experts
        new_config, changes, notes = reduced_config(config, spec, traits, src.dims, m)
        adjustments += notes
        out_spec = spec
        new_top_k = _top_k_of(spec, resolve_dims(spec, new_config))
    tensors, sources, dropped_tensors = output_tensors(
        src.checkpoint,
        spec,
        src.dims,
        src.layout,
        m=m,
        dense_spec=dense_spec,
        dense_width=dense_width,
        expert_dtype=src.expert_dtype,
    )
    zeros, extra = check_against_registry(tensors, out_spec, new_config, prefix=src.prefix)
    if zeros:
        adjustments.append(
            f"{len(zeros)} bias tensor(s) the {out_spec.name} architecture expects were written as zeros "
            f"(e.g. {zeros[0].name}): exact, the source has none"
        )
    if extra:
        warnings.append(
            f"{len(extra)} tensor(s) not named by the registry were copied unchanged: {', '.join(extra[:3])}"
        )
    if dropped_tensors:
        adjustments.append(f"{len(dropped_tensors)} multi-token-prediction tensor(s) left out")
    tensors += zeros
    renormalises = _routing_renormalises(spec, config)
    scaling = _scaling(spec, config)
    return _Plan(
        method=method,
        refit_down=refit_down,
        dense_spec=dense_spec,
        out_spec=out_spec,
        m=m,
        new_top_k=new_top_k,
        new_config=new_config,
        changes=changes,
        routed_width=routed_width,
        dense_width=dense_width,
        shared_widths=shared_widths,
        tensors=tensors,
        sources=sources,
        zeros=zeros,
        predicted_bytes=sum(t.nbytes for t in tensors),
        act=expert_activation(traits, config),
        sigmoid_router=spec.routing.rule in (Routing.SIGMOID_GROUPED_TOPK, Routing.TOPK_SIGMOID),
        renormalises=renormalises,
        scaling=scaling,
        rule=_routing_rule(spec, traits, renormalises, scaling, new_top_k) if dense_spec is None else None,
        adjustments=adjustments,
        warnings=warnings,
    )


def _check_output(source: _Source, plan: _Plan, out_path: Path, *, overwrite: bool) -> list[Path]:
    """Check the output path against the resolved input and the disk against the predicted size."""
    from moetool.io.writer import check_disk_space, check_output_path

    inputs = [source.checkpoint.root] if source.checkpoint.root is not None else []
    check_output_path(out_path, inputs, overwrite=overwrite)
    check_disk_space(out_path, plan.predicted_bytes)
    return inputs


def _run_calibration(
    source: _Source,
    plan: _Plan,
    options: MergeOptions,
    texts: _Texts,
    stats: Any,
    *,
    progress: Progress | None,
) -> tuple[Calibration, _Counting | None]:
    """The routing statistics each layer's decision reads: from a stats file, or one pass of the text."""
    if stats is not None:
        return _calibration_from_stats(stats, n=source.n, moe_layers=source.moe_layers, top_k=source.top_k), None
    assert texts.calibration is not None
    counted = _Counting(texts.calibration)
    keep_sample = _needs_sample(plan.method, plan.dense_spec is not None, options.refit_router, options.align)
    cal = _calibrate(
        source.checkpoint,
        source.spec,
        counted,
        name=texts.calibration_name,
        max_tokens=texts.max_tokens,
        seq_len=texts.seq_len,
        batch_size=texts.batch_size,
        sample_tokens=options.sample_tokens if keep_sample else 0,
        seed=options.seed,
        device=options.device,
        dtype=options.dtype,
        whole_model=options.whole_model,
        progress=progress,
    )
    return cal, counted


def _stream_layers(
    source: _Source,
    plan: _Plan,
    cal: Calibration,
    staging: Path,
    options: MergeOptions,
    *,
    progress: Progress | None,
) -> tuple[list[LayerDecision], WriteResult]:
    """Write every planned tensor, one layer at a time, each checked against the plan; then config.json."""
    from moetool.io.writer import copy_aux_files, write_json

    checkpoint, dims = source.checkpoint, source.dims
    dense_spec = plan.dense_spec
    decisions: list[LayerDecision] = []
    expected = {t.name: t for t in plan.tensors}
    copies_by_layer: dict[int | None, list[str]] = {}
    for t in plan.tensors:
        if t.kind == "copy" and t.source is not None:
            copies_by_layer.setdefault(t.layer, []).append(t.source)
    with open_writer(staging, plan.tensors, max_shard_size=options.max_shard_size) as writer:

        def emit(name: str, tensor: torch.Tensor) -> None:
            planned = expected.pop(name, None)
            got = (tuple(tensor.shape), dtype_name(tensor.dtype))
            if planned is None or got != (planned.shape, planned.dtype):
                want = None if planned is None else (planned.shape, planned.dtype)
                raise MoetoolError(
                    f"internal check failed: {name} came out as {got}, the plan said {want}",
                    hint="this is a bug in moetool merge; please report it",
                    code="MERGE_PLAN_MISMATCH",
                )
            writer.add(name, tensor)

        for layer in plan.sources:
            # Read a layer's unchanged tensors (one shard open at a time), write them in plan order.
            wanted = copies_by_layer.get(layer, [])
            copied = dict(checkpoint.iter_tensors(wanted))
            for name in wanted:
                emit(name, copied.pop(name))
            if layer is None:
                continue
            if dims.is_moe_layer(layer):
                decisions.append(_process_moe_layer(source, plan, options, cal, layer, emit))
            elif dense_spec is not None:
                _process_dense_layer(source, plan, layer, emit)
            if progress is not None:
                progress("writing", 1, len(plan.sources) - 1, unit=LAYERS)
        for t in plan.zeros:
            import torch

            emit(t.name, torch.zeros(t.shape, dtype=torch_dtype(t.dtype)))
    if expected:
        raise MoetoolError(
            f"internal check failed: {len(expected)} planned tensor(s) were not written ({next(iter(expected))})",
            hint="this is a bug in moetool merge; please report it",
            code="MERGE_PLAN_MISMATCH",
        )
    write_json(staging / "config.json", plan.new_config)
    copy_aux_files(checkpoint.root, staging)
    return decisions, writer.result


def _evaluate_output(
    source: _Source,
    staging: Path,
    options: MergeOptions,
    texts: _Texts,
    counted: _Counting | None,
    warnings: list[str],
    *,
    progress: Progress | None,
) -> EvalFigures | None:
    """Measure the staged output against the source on held-out text (``None``: not asked, or no text left)."""
    if not options.evaluate:
        return None
    documents, name = _eval_documents(
        texts.evaluation, texts.eval_name, texts.calibration, texts.calibration_name, counted
    )
    if documents is None:
        if texts.calibration is not None or texts.evaluation is not None:
            warnings.append("no held-out text left for evaluation (calibration read every document)")
        return None
    t0 = time.perf_counter()
    try:
        figures = _evaluate(
            source.checkpoint,
            staging,
            documents,
            name=name,
            seq_len=texts.seq_len,
            batch_size=texts.batch_size,
            max_tokens=options.eval_max_tokens,
            device=options.device,
            dtype=options.dtype,
            whole_model=options.whole_model,
            progress=progress,
        )
    except DatasetError as exc:
        if exc.code != "DATASET_EMPTY":
            raise
        # The merge itself is done and checked: held-out text too short to score costs the figures only.
        warnings.append(f"no held-out text scored: every window of {name} holds fewer than 2 tokens")
        return None
    figures.seconds = time.perf_counter() - t0
    return figures


def _result(
    model: str,
    out_path: Path,
    source: _Source,
    plan: _Plan,
    options: MergeOptions,
    cal: Calibration,
    decisions: list[LayerDecision],
    files: WriteResult,
    figures: EvalFigures | None,
) -> MergeResult:
    """The result object (timings are added by the caller once everything is done)."""
    checkpoint = source.checkpoint
    dense = plan.dense_spec is not None
    return MergeResult(
        model=model,
        output=str(out_path),
        revision=checkpoint.revision,
        family=source.spec.name,
        model_type=source.config.get("model_type"),
        output_model_type=plan.new_config.get("model_type"),
        mode="dense" if dense else "experts",
        method=None if dense else plan.method,
        dense_strategy=options.dense_strategy if dense else None,
        align=options.align,
        refit_router=options.refit_router,
        refit_down=bool(plan.refit_down),
        num_experts_before=source.n,
        num_experts_after=0 if dense else plan.m,
        top_k_before=source.top_k,
        top_k_after=0 if dense else plan.new_top_k,
        intermediate_size=plan.dense_width,
        config_changes=plan.changes,
        adjustments=plan.adjustments,
        calibration={
            "source": cal.source,
            "tokens": cal.tokens,
            "sample_tokens_per_layer": max((c.sample.size for c in cal.layers.values() if c.sample), default=0),
            **cal.description,
        },
        layers=decisions,
        source_bytes=checkpoint.total_bytes(),
        predicted_bytes=plan.predicted_bytes,
        written_bytes=files.total_size,
        source_params=sum(_numel(info.shape) for info in checkpoint.tensors.values()),
        output_params=sum(t.numel for t in plan.tensors),
        files=[*files.files, "config.json", "README.md"],
        eval=figures,
        warnings=plan.warnings,
    )


def _write_card(
    staging: Path,
    result: MergeResult,
    model: str,
    out: str | Path,
    command: str | Sequence[str] | None,
    source: _Source,
    plan: _Plan,
    options: MergeOptions,
    texts: _Texts,
) -> None:
    """The output's model card: what was done, with which options, and the figures."""
    from moetool.io.model_card import write_model_card

    pruned = plan.method in PRUNING_METHODS and not options.to_dense
    write_model_card(
        staging,
        base_models=[model],
        relation="merge",
        command=command or f"moetool merge {model} -o {out}",
        options=_card_options(result, texts.max_tokens, texts.seq_len, options.sample_tokens, options.seed),
        revision=source.checkpoint.revision,
        tags=["merge", "pruned" if pruned else "expert-merging"],
        summary=card_summary(result),
        results=_card_results(result),
    )


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for dim in shape:
        total *= dim
    return total


def _top_k_of(spec: FamilySpec, dims: Dims) -> int:
    value = dims.values["K"]
    return max(value) if isinstance(value, list) else int(value)


def expert_activation(traits: MergeTraits, config: dict[str, Any]) -> Callable:
    """The routed experts' activation: the first of the family's activation keys present (silu, as
    transformers, when none is)."""
    from moetool.arch.dims import text_config
    from moetool.arch.registry import family_for_config
    from moetool.merge.ffn import activation

    cfg = text_config(family_for_config(config), config)
    # The first of the family's activation keys present wins; transformers' default is silu.
    name = next((v for key in traits.act_keys if isinstance(v := get_path(cfg, key), str)), "silu")
    try:
        return activation(name)
    except KeyError:
        raise ConfigError(f"unknown activation {name!r} in config.json", hint="merge handles SwiGLU experts") from None


def default_method(spec: FamilySpec, traits: MergeTraits, *, have_stats: bool) -> str:
    """The method used when none is given: ``search`` where it can run, else ``frequency``.

    ``search`` needs calibration hidden states (a ``--dataset`` pass, not a stats file) and a routing rule
    that moetool models (not Llama-4's, whose weight scales the expert's input, nor a capacity-limited
    router's, whose drops depend on the other tokens of the batch).
    """
    modelled = _routing_rule(spec, traits, renormalises=True, scaling=1.0, top_k=1) is not None
    return DEFAULT_METHOD if modelled and not have_stats else FALLBACK_METHOD


def _routing_rule(
    spec: FamilySpec, traits: MergeTraits, renormalises: bool, scaling: float, top_k: int
) -> RoutingRule | None:
    """The reduced layer's routing rule, for refitting its router to the layer output (None: not modelled)."""
    from moetool.merge.router import RoutingRule

    if traits.router_scales_input or spec.router_output.capacity_limited:
        return None
    kind = {
        Routing.SOFTMAX_TOPK: "softmax",
        Routing.TOPK_SOFTMAX: "topk_softmax",
        Routing.SIGMOID_GROUPED_TOPK: "sigmoid",
    }.get(spec.routing.rule)
    if kind is None:
        return None
    return RoutingRule(kind, top_k, renormalize=renormalises, scaling=scaling)


def _weight_sum(cal: LayerCalibration, renormalises: bool, scaling: float) -> float:
    """Mean total routing weight per token: measured when there was a calibration pass."""
    if cal.weight_mean is not None and cal.weight_sum is not None:
        return cal.weight_sum
    if renormalises:
        return scaling
    return (cal.weight_sum if cal.weight_sum is not None else 1.0) * scaling


def _dense_widths(
    checkpoint: Checkpoint,
    spec: FamilySpec,
    dims: Dims,
    layout: LayerTensors,
    strategy: str,
    intermediate_size: int | None,
    top_k: int,
    n: int,
) -> tuple[int, int, dict[int, int], list[str]]:
    """(routed width, output width, shared-expert width per MoE layer, notes) for ``--to-dense``."""
    moe_layers = sorted(dims.moe_layers)
    widths = {layout.width(layer) for layer in moe_layers}
    if len(widths) != 1:
        raise UnsupportedArchitectureError("--to-dense: MoE layers of different expert widths are not supported")
    size = widths.pop()
    if strategy == "concat":
        routed = intermediate_size if intermediate_size is not None else top_k * size
        if not 1 <= routed <= n * size:
            raise UsageError(
                f"--intermediate-size {routed}: concat takes 1 to {n * size} neurons ({n} experts of {size})",
                code="WIDTH_OUT_OF_RANGE",
            )
    else:
        routed = size
    shared: dict[int, int] = {}
    for layer in moe_layers:
        names = layout.shared_names(layer)
        if names and names[0] in checkpoint.tensors:
            shared[layer] = int(checkpoint.tensors[names[0]].shape[0])
    per_layer = {layer: routed + shared.get(layer, 0) for layer in moe_layers}
    dense_layers = [layer for layer in range(dims.num_layers) if layer not in dims.moe_layers]
    dense = int(dims.values.get("D") or 0) if dense_layers else 0
    width = max([*per_layer.values(), dense])
    notes = []
    if shared:
        notes.append("shared expert neurons concatenated into the dense FFN")
    padded = sorted({w for w in per_layer.values() if w < width} | ({dense} if dense and dense < width else set()))
    if padded:
        notes.append(
            f"FFN widths {padded} zero-padded to {width} (one intermediate_size for every layer; zero neurons "
            "are exact)"
        )
    return routed, width, shared, notes


def _calibration_from_stats(stats: Any, *, n: int, moe_layers: list[int], top_k: int) -> Calibration:
    from moetool.merge.calibrate import from_stats
    from moetool.routing.stats import RoutingStats

    loaded = stats if isinstance(stats, RoutingStats) else RoutingStats.load(Path(stats))
    return from_stats(loaded, num_experts=n, moe_layers=moe_layers, top_k=top_k)


def _calibrate(
    checkpoint: Checkpoint,
    spec: FamilySpec,
    documents: Iterable[Document],
    *,
    name: str,
    max_tokens: int | None,
    seq_len: int,
    batch_size: int,
    sample_tokens: int,
    seed: int,
    device: str,
    dtype: str,
    whole_model: bool,
    progress: Progress | None,
) -> Calibration:
    from moetool.data import iter_batches, iter_windows
    from moetool.merge.calibrate import calibrate
    from moetool.runner.open import open_runner

    # The checkpoint merge opened: its headers are not read again.
    opened = open_runner(checkpoint, device=device, dtype=dtype, whole_model=whole_model)
    tokenizer = opened.tokenizer
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    windows = iter_windows(tokenizer, documents, seq_len=seq_len, max_tokens=max_tokens)
    batches = iter_batches(windows, batch_size=batch_size, pad_id=pad_id)

    description = {"dataset": name, "max_tokens": max_tokens, "seq_len": seq_len, "streamed": opened.streamed}
    try:
        return calibrate(
            opened.runner,
            spec,
            batches,
            sample_tokens=sample_tokens,
            seed=seed,
            on_batch=token_counter(progress, "calibrating", max_tokens),
            description=description,
        )
    finally:
        # The structural pass below needs no model: free it before tensors are streamed.
        del opened
        gc.collect()


def _process_moe_layer(
    source: _Source,
    plan: _Plan,
    options: MergeOptions,
    cal: Calibration,
    layer: int,
    emit: Callable[[str, Any], None],
) -> LayerDecision:
    """Read one MoE layer's router and experts, decide, combine and write its new tensors."""
    from moetool.merge.combine import pad

    checkpoint, layout, traits = source.checkpoint, source.layout, source.traits
    dense_spec, routed_width, dense_width = plan.dense_spec, plan.routed_width, plan.dense_width
    n = int(source.dims.values["E"])
    experts = layout.read_experts(checkpoint, layer, n, layout.width(layer))
    router_names = layout.router_names(layer)
    router = [checkpoint.read_tensor(name) for name in router_names]
    inputs = LayerInputs(layer, experts, router, cal.layers[layer], plan.act)
    dtype = torch_dtype(source.expert_dtype)
    if dense_spec is None:
        decision, merged, new_router = _reduce_layer(
            plan.method,
            plan.m,
            inputs,
            traits,
            align=options.align,
            refit_router=options.refit_router,
            sigmoid_router=plan.sigmoid_router,
            rule=plan.rule,
        )
        # The layer's original experts are no longer needed: free them before the output is converted.
        del experts, inputs
        for name, tensor in zip(router_names, new_router, strict=True):
            emit(name, tensor.contiguous())
        for name, tensor in layout.expert_tensors(layer, merged, dtype):
            emit(name, tensor)
        return decision
    assert routed_width is not None and dense_width is not None
    shared = shared_gate = None
    if layer in plan.shared_widths:
        names = layout.shared_names(layer)
        shared = FFN(*(checkpoint.read_tensor(name).float() for name in names))
        gate_name = layout.shared_gate_name(layer)
        if gate_name is not None:
            if cal.layers[layer].sample is None:
                raise UsageError(
                    "--to-dense folds the gated shared expert in with its mean gate, which needs calibration "
                    "hidden states",
                    hint="pass --dataset instead of --stats",
                    code="NEEDS_DATASET",
                )
            shared_gate = checkpoint.read_tensor(gate_name)
    decision, ffn = _dense_layer(
        options.dense_strategy,
        inputs,
        routed_width=routed_width,
        weight_sum=_weight_sum(cal.layers[layer], plan.renormalises, plan.scaling),
        shared=shared,
        shared_gate=shared_gate,
        align=options.align,
        refit_down=plan.refit_down,
        scales_input=traits.router_scales_input,
    )
    padded = pad(ffn, dense_width)
    base = layout.prefix + dense_spec.layer_prefix.format(L=layer)
    for template, tensor in zip(dense_spec.dense_mlp[:3], (padded.gate, padded.up, padded.down), strict=True):
        assert tensor is not None
        emit(base + template.name, tensor.to(dtype).contiguous())
    return decision


def _process_dense_layer(source: _Source, plan: _Plan, layer: int, emit: Callable[[str, Any], None]) -> None:
    """A dense layer of the MoE, rewritten with the dense target's names and padded to its width."""
    from moetool.merge.combine import pad

    dense_spec, dense_width, layout = plan.dense_spec, plan.dense_width, source.layout
    assert dense_spec is not None and dense_width is not None
    base = layout.layer_prefix(layer)
    ffn = FFN(*(source.checkpoint.read_tensor(base + t.name).float() for t in source.spec.dense_mlp[:3]))
    padded = pad(ffn, dense_width)
    out_base = layout.prefix + dense_spec.layer_prefix.format(L=layer)
    dtype = torch_dtype(source.expert_dtype)
    for template, tensor in zip(dense_spec.dense_mlp[:3], (padded.gate, padded.up, padded.down), strict=True):
        assert tensor is not None
        emit(out_base + template.name, tensor.to(dtype).contiguous())


def _eval_documents(
    eval_documents: Sequence[Document] | None,
    eval_name: str,
    calibration: Iterable[Document] | None,
    calibration_name: str,
    counted: _Counting | None,
) -> tuple[list[Document] | None, str]:
    if eval_documents is not None:
        return (list(eval_documents) or None), eval_name
    if counted is not None and isinstance(calibration, Sequence):
        rest = list(calibration[counted.taken :])
        if rest:
            return rest, f"{calibration_name} (documents {counted.taken}+, not used for calibration)"
    return None, ""


def _evaluate(
    checkpoint: Checkpoint,
    staging: Path,
    documents: list[Document],
    *,
    name: str,
    seq_len: int,
    batch_size: int,
    max_tokens: int | None,
    device: str,
    dtype: str,
    whole_model: bool,
    progress: Progress | None,
) -> EvalFigures:
    """Perplexity of the original and the merged model, KL and top-1 agreement: one pass of each."""
    from moetool.data import DatasetSpec
    from moetool.evaluate import evaluate
    from moetool.runner.open import open_runner

    original = open_runner(checkpoint, device=device, dtype=dtype, whole_model=whole_model)
    merged = open_runner(str(staging), device=device, dtype=dtype, whole_model=whole_model)

    data = DatasetSpec.of_documents(documents, name, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size)
    after = evaluate(
        merged.runner,
        merged.tokenizer,
        data,
        progress=progress,
        reference_model=original.runner,
        reference_tokenizer=original.tokenizer,
    )
    del original, merged
    gc.collect()
    return EvalFigures(
        dataset=name,
        tokens=after.tokens,
        perplexity_before=float(after.reference_perplexity),
        perplexity_after=after.perplexity,
        kl=float(after.kl) if after.kl is not None else float("nan"),
        top1_agreement=float(after.top1_agreement) if after.top1_agreement is not None else float("nan"),
        seconds=0.0,
    )


# ----------------------------------------------------------------------------- reporting


def describe_layer(decision: LayerDecision, mode: str) -> str:
    """One line per layer: which source experts each output expert comes from."""
    if mode == "dense":
        return f"dense FFN from experts {', '.join(map(str, decision.groups[0]))}"
    parts = []
    for j, members in enumerate(decision.groups):
        parts.append(f"{j}←{members[0]}" if len(members) == 1 else f"{j}←{'+'.join(map(str, members))}")
    return " ".join(parts)


def card_summary(result: MergeResult) -> str:
    """The model card's paragraph and per-layer table."""
    if result.mode == "dense":
        head = (
            f"A dense {result.output_model_type} model made by moetool from {result.model} "
            f"({result.family}, {result.num_experts_before} experts per MoE layer, top-{result.top_k_before}): each "
            f"MoE layer's experts were aggregated into one FFN of width {result.intermediate_size} "
            f"(strategy `{result.dense_strategy}`)."
        )
    else:
        head = (
            f"{result.model} ({result.family}) reduced by moetool from {result.num_experts_before} to "
            f"{result.num_experts_after} routed experts per MoE layer (top-{result.top_k_before} -> "
            f"top-{result.top_k_after}) with method `{result.method}`"
            + (" and a refitted router" if result.refit_router else "")
            + "."
        )
    lines = [head, "", "| layer | output experts (output ← source experts) | dropped |", "| --- | --- | --- |"]
    for decision in result.layers:
        dropped = ", ".join(map(str, decision.dropped)) or "-"
        lines.append(f"| {decision.layer} | {describe_layer(decision, result.mode)} | {dropped} |")
    if result.adjustments:
        lines += ["", "Adjustments: " + "; ".join(result.adjustments) + "."]
    return "\n".join(lines)


def _card_options(result: MergeResult, max_tokens: int | None, seq_len: int, sample: int, seed: int) -> dict[str, Any]:
    options: dict[str, Any] = {"mode": result.mode}
    if result.mode == "dense":
        options["dense_strategy"] = result.dense_strategy
        options["intermediate_size"] = result.intermediate_size
        options["refit_down"] = result.refit_down
    else:
        options["num_experts"] = result.num_experts_after
        options["method"] = result.method
        options["refit_router"] = result.refit_router
    options["align_neurons"] = result.align
    options["calibration"] = result.calibration.get("dataset") or result.calibration.get("source")
    # (No "token" in these names: the card masks options that look like secrets.)
    options["calibration_size"] = result.calibration.get("tokens")
    options["calibration_limit"] = max_tokens
    options["seq_len"] = seq_len
    options["hidden_state_sample_per_layer"] = sample
    options["seed"] = seed
    return options


def _card_results(result: MergeResult) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "size before (bytes)": result.source_bytes,
        "size after (bytes)": result.written_bytes,
        "parameters before": result.source_params,
        "parameters after": result.output_params,
    }
    if result.eval is not None:
        figures["evaluation text"] = result.eval.dataset
        figures["evaluation tokens"] = result.eval.tokens
        figures["perplexity before"] = result.eval.perplexity_before
        figures["perplexity after"] = result.eval.perplexity_after
        figures["KL(source ‖ output)"] = result.eval.kl
        figures["top-1 agreement with the source"] = result.eval.top1_agreement
    return figures
