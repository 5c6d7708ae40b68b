"""The merge methods, by ``--method`` name: one :class:`MergeMethod` each in :data:`METHODS`.

A pruning method chooses the M experts a layer keeps (:attr:`MergeMethod.select`); a merging method
groups the N experts into M groups that are averaged (:attr:`MergeMethod.group`). Everything else
(the router rows, the refits, the neuron alignment, writing) is common to every method and lives in
:mod:`moetool.merge.api`. Adding a method is one function here (over :class:`LayerInputs`: the layer's
experts, router tensors and calibration) and its entry in :data:`METHODS`; the scoring and grouping
arithmetic itself belongs in :mod:`~moetool.merge.scores` and :mod:`~moetool.merge.grouping`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from moetool.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    import torch

    from moetool.arch.spec import MergeTraits
    from moetool.merge.calibrate import LayerCalibration
    from moetool.merge.layout import Experts
    from moetool.merge.router import RoutingRule

__all__ = ["MERGE", "METHODS", "PRUNE", "LayerInputs", "MergeMethod", "output_similarity"]

PRUNE = "prune"
MERGE = "merge"

# Bound on the floats of the [tokens, N, H] expert outputs the search holds (1 GiB).
_SEARCH_FLOATS = 2**28


@dataclass
class LayerInputs:
    """What a method sees of one MoE layer.

    Attributes:
        layer: the decoder layer index.
        experts: the routed experts (canonical, float32).
        router: the router weight, then its per-expert vectors (a correction bias, ...).
        calibration: the layer's routing counts and probabilities, and its token sample (``None`` with a
            stats file).
        act: the experts' activation.
    """

    layer: int
    experts: Experts
    router: list[torch.Tensor]
    calibration: LayerCalibration
    act: Callable


#: ``select(inputs, m, traits, rule) -> (kept experts, importance per expert, notes)``.
Select = Callable[["LayerInputs", int, "MergeTraits", "RoutingRule | None"], "tuple[list[int], list[float], dict]"]
#: ``group(inputs, m, traits) -> M groups of expert indices``.
Group = Callable[["LayerInputs", int, "MergeTraits"], "list[list[int]]"]


@dataclass(frozen=True)
class MergeMethod:
    """One ``--method``.

    Attributes:
        name: the ``--method`` value.
        kind: :data:`PRUNE` (keep M experts) or :data:`MERGE` (average M groups).
        needs_sample: it needs calibration hidden states (a ``--dataset`` pass; a stats file has none).
        select: a pruning method's choice of experts.
        group: a merging method's grouping.
    """

    name: str
    kind: str
    needs_sample: bool = False
    select: Select | None = None
    group: Group | None = None


def output_similarity(inputs: LayerInputs, tokens: int = 512) -> torch.Tensor:
    """Cosine similarity of the experts' outputs on (up to ``tokens``) calibration tokens."""
    import torch

    from moetool.merge.ffn import expert_forward
    from moetool.merge.grouping import row_similarity

    sample = inputs.calibration.sample
    assert sample is not None
    x = sample.x[:tokens].float()
    n = inputs.experts.num_experts
    outs = torch.empty((n, x.shape[0] * inputs.experts.down.shape[1]), dtype=torch.float32)
    for e in range(n):  # filled in place: one expert's output exists at a time besides the stack
        outs[e] = expert_forward(inputs.experts, e, x, inputs.act).reshape(-1)
    return row_similarity(outs)


# ----------------------------------------------------------------------------- pruning


def _by_importance(score: Callable[[LayerInputs, MergeTraits], list[float]]) -> Select:
    """A pruning method that keeps the M experts of highest ``score``."""

    def select(inputs: LayerInputs, m: int, traits: MergeTraits, rule: RoutingRule | None) -> tuple:
        from moetool.merge.grouping import top_m

        importance = score(inputs, traits)
        return top_m(importance, m), importance, {}

    return select


def _frequency(inputs: LayerInputs, traits: MergeTraits) -> list[float]:
    from moetool.merge import scores

    return scores.frequency(inputs.calibration.counts)


def _soft_frequency(inputs: LayerInputs, traits: MergeTraits) -> list[float]:
    from moetool.merge import scores

    return scores.soft_frequency(inputs.calibration.prob_mean)


def _norms(inputs: LayerInputs, traits: MergeTraits, *, weighted: bool) -> tuple[list[float], list[int]]:
    from moetool.merge import scores

    sample = inputs.calibration.sample
    assert sample is not None
    return scores.contribution_norms(
        inputs.experts,
        sample.x,
        sample.indices,
        sample.weights,
        inputs.act,
        scales_input=traits.router_scales_input,
        weighted=weighted,
    )


def _reap(inputs: LayerInputs, traits: MergeTraits) -> list[float]:
    from moetool.merge import scores

    return scores.reap(*_norms(inputs, traits, weighted=True))


def _ean(inputs: LayerInputs, traits: MergeTraits) -> list[float]:
    from moetool.merge import scores

    return scores.ean(_norms(inputs, traits, weighted=False)[0])


def _search(inputs: LayerInputs, m: int, traits: MergeTraits, rule: RoutingRule | None) -> tuple:
    """The kept set whose pruned layer reproduces the original output best (see moetool.merge.search)."""
    import dataclasses

    import torch

    from moetool.merge.combine import routed_output
    from moetool.merge.ffn import expert_forward
    from moetool.merge.search import LayerOutputs, best_subset

    if rule is None:
        raise UnsupportedArchitectureError(
            "--method search models the layer output, which this family's routing (a weight on the "
            "expert's input, or a capacity limit) does not allow",
            hint="use --method reap",
        )
    sample = inputs.calibration.sample
    assert sample is not None
    n_experts, hidden = inputs.experts.num_experts, inputs.experts.hidden_size
    n = min(sample.size, max(256, _SEARCH_FLOATS // max(n_experts * hidden, 1)))
    x = sample.x[:n].float()
    target = routed_output(inputs.experts, x, sample.indices[:n], sample.weights[:n], inputs.act, scales_input=False)
    outputs = torch.stack([expert_forward(inputs.experts, e, x, inputs.act) for e in range(n_experts)], dim=1)
    bias = inputs.router[1].float() if len(inputs.router) > 1 and rule.kind == "sigmoid" else None
    layer = LayerOutputs(outputs, target, sample.logits[:n])
    kept, error, exhaustive = best_subset(layer, n_experts, m, dataclasses.replace(rule, bias=bias))
    notes = {"output_error": round(error, 6), "search": "exhaustive" if exhaustive else "greedy", "tokens": n}
    return kept, [float(c) for c in inputs.calibration.counts], notes


# ----------------------------------------------------------------------------- merging


def _merge_frequency(inputs: LayerInputs, m: int, traits: MergeTraits) -> list[list[int]]:
    from moetool.merge.grouping import around_anchors, column_similarity, row_similarity

    sample = inputs.calibration.sample
    similarity = column_similarity(sample.logits) if sample is not None else row_similarity(inputs.router[0])
    return around_anchors(similarity, _freq(inputs), m)


def _merge_router(inputs: LayerInputs, m: int, traits: MergeTraits) -> list[list[int]]:
    from moetool.merge.grouping import cluster, row_similarity

    return cluster(row_similarity(inputs.router[0]), _freq(inputs), m)


def _merge_output(inputs: LayerInputs, m: int, traits: MergeTraits) -> list[list[int]]:
    from moetool.merge.grouping import cluster

    return cluster(output_similarity(inputs), _freq(inputs), m)


def _freq(inputs: LayerInputs) -> list[float]:
    return [float(c) for c in inputs.calibration.counts]


#: Every ``--method``, pruning methods first, in the order ``--help`` lists them.
METHODS: dict[str, MergeMethod] = {
    method.name: method
    for method in (
        MergeMethod("frequency", PRUNE, select=_by_importance(_frequency)),
        MergeMethod("soft-frequency", PRUNE, select=_by_importance(_soft_frequency)),
        MergeMethod("reap", PRUNE, needs_sample=True, select=_by_importance(_reap)),
        MergeMethod("search", PRUNE, needs_sample=True, select=_search),
        MergeMethod("ean", PRUNE, needs_sample=True, select=_by_importance(_ean)),
        MergeMethod("merge-frequency", MERGE, group=_merge_frequency),
        MergeMethod("merge-router", MERGE, group=_merge_router),
        MergeMethod("merge-output", MERGE, needs_sample=True, group=_merge_output),
    )
}
