"""One pass of calibration text through the model, recording what merging needs at each MoE layer.

Hooks sit on the router modules (:func:`moetool.routing.observe.find_routers`), so they see the exact
hidden states every MoE block receives and the exact expert choices and weights the model makes. Per
layer, over all calibration tokens (padding excluded):

* ``counts``: top-k selections per expert (what profile-routing calls counts);
* ``prob_mean``: mean softmax router probability per expert (profile-routing's ``prob_mean``);
* ``weight_mean``: mean routing weight per expert, 0 where not chosen (``E[w_e]``), and
  ``weight_sum``: the mean total routing weight per token (1 where the family renormalises);

and a uniform random sample of at most ``sample_tokens`` tokens (reservoir sampling with random keys,
so memory is bounded whatever the dataset size): their hidden states, router logits, chosen experts
and routing weights. Everything that needs expert outputs (REAP, output similarity, router refitting,
the dense strategies) is computed later from this sample and the checkpoint's expert tensors, one
layer at a time, after the model is freed.

The same per-layer figures can come from a profile-routing stats file (:func:`from_stats`), without a
sample: methods that need one then refuse.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moetool.arch.dims import get_path
from moetool.arch.spec import FamilySpec, RouterOutput
from moetool.errors import MoetoolError, UsageError

if TYPE_CHECKING:
    import torch

    from moetool.routing.stats import RoutingStats

DEFAULT_SAMPLE_TOKENS = 8192


@dataclass
class Sample:
    """Calibration tokens kept for one layer.

    Attributes:
        x: hidden states at the MoE block input ``[n, H]`` (float32).
        logits: router logits ``[n, N]``.
        indices / weights: chosen experts and their routing weights ``[n, k]``.
    """

    x: torch.Tensor
    logits: torch.Tensor
    indices: torch.Tensor
    weights: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.x.shape[0])


@dataclass
class LayerCalibration:
    """What calibration measured at one MoE layer (see the module docstring)."""

    layer: int
    tokens: int
    counts: list[int]
    prob_mean: list[float]
    weight_mean: list[float] | None = None
    weight_sum: float | None = None
    sample: Sample | None = None

    @property
    def num_experts(self) -> int:
        return len(self.counts)


@dataclass
class Calibration:
    """Per-layer calibration figures, from a dataset pass or a stats file."""

    source: str  # "dataset" or "stats"
    tokens: int
    layers: dict[int, LayerCalibration]
    description: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def has_sample(self) -> bool:
        return all(layer.sample is not None for layer in self.layers.values())


def routing_decision(
    output: Any, spec: FamilySpec, config: Mapping[str, Any], top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, indices, weights)`` of one router call, as the MoE block applies them.

    Routers that return only logits (DBRX) or masked scores (Llama-4) get the family's rule applied.
    Capacity-limited routers (Switch, NLLB-MoE) are decoded as profile-routing decodes them; a choice
    dropped for capacity gets weight 0, as the model gives it.
    """
    import torch

    if spec.router_output.capacity_limited:
        from moetool.routing.observe import decode_capacity_output

        logits, indices, kept = decode_capacity_output(output, spec)
        # Switch weighs its one expert by the softmax probability; NLLB returns its combine weights.
        switch = spec.router_output is RouterOutput.SWITCH_MASK
        scores = torch.softmax(logits.float(), dim=-1) if switch else output[1]
        return logits, indices, scores.reshape(logits.shape).gather(1, indices).float() * kept
    if spec.router_output is RouterOutput.LOGITS_WEIGHTS_INDICES:
        logits, weights, indices = output
    elif spec.router_output is RouterOutput.SCORES_LOGITS:
        scores, logits = output
        indices = torch.topk(logits, top_k, dim=-1).indices
        weights = scores.reshape(-1, scores.shape[-1]).gather(-1, indices.reshape(-1, top_k))
    else:
        logits = output
        probs = torch.softmax(logits.float(), dim=-1)
        weights, indices = torch.topk(probs, top_k, dim=-1)
        norm = get_path(config, spec.routing.renormalize_key) if spec.routing.renormalize_key else None
        if isinstance(norm, (int, float)) and not isinstance(norm, bool) and norm > 0:
            weights = weights / torch.norm(weights, p=float(norm), dim=-1, keepdim=True)
    logits = logits.reshape(-1, logits.shape[-1])
    return logits, indices.reshape(-1, indices.shape[-1]), weights.reshape(-1, weights.shape[-1])


class _LayerAccumulator:
    """One layer's counts, sums and token sample.

    Each layer draws its sample keys from a generator of its own (seeded by the seed and the layer), so
    the sample does not depend on the order layers see batches (batch by batch through the whole model,
    or layer by layer through the streamed runner).
    """

    def __init__(self, layer: int, num_experts: int, cap: int, generator: torch.Generator) -> None:
        import torch

        self.layer = layer
        self.num_experts = num_experts
        self.cap = cap
        self.generator = generator
        self.tokens = 0
        self.counts = torch.zeros(num_experts, dtype=torch.int64)
        self.prob_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.weight_sum = torch.zeros(num_experts, dtype=torch.float64)
        self.keys: torch.Tensor | None = None
        self.kept: list[torch.Tensor] | None = None

    def update(self, x: torch.Tensor, logits: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> None:
        import torch

        n = x.shape[0]
        if n == 0:
            return
        self.tokens += n
        self.counts += torch.bincount(indices.reshape(-1).cpu(), minlength=self.num_experts)
        self.prob_sum += torch.softmax(logits.float(), dim=-1).sum(0).double().cpu()
        self.weight_sum.index_add_(0, indices.reshape(-1).cpu(), weights.reshape(-1).double().cpu())
        if self.cap <= 0:
            return
        # Reservoir sampling by random keys: keeping the cap largest keys of everything seen is a uniform
        # sample without replacement, and memory never exceeds cap + one batch.
        keys = torch.rand(n, generator=self.generator)
        parts = [x.float().cpu(), logits.float().cpu(), indices.cpu(), weights.float().cpu()]
        if self.kept is not None and self.keys is not None:
            keys = torch.cat([self.keys, keys])
            parts = [torch.cat([old, new]) for old, new in zip(self.kept, parts, strict=True)]
        if keys.shape[0] > self.cap:
            top = torch.topk(keys, self.cap).indices
            keys = keys[top]
            parts = [p[top] for p in parts]
        self.keys = keys
        self.kept = [p.clone() for p in parts]

    def freeze(self) -> LayerCalibration:
        import torch

        tokens = self.tokens
        sample = None
        if self.kept is not None and self.keys is not None:
            # A stable order (by key) so the same seed gives the same sample order.
            order = torch.argsort(self.keys, descending=True)
            x, logits, indices, weights = (p[order] for p in self.kept)
            sample = Sample(x=x, logits=logits, indices=indices.long(), weights=weights)
        return LayerCalibration(
            layer=self.layer,
            tokens=tokens,
            counts=[int(c) for c in self.counts.tolist()],
            prob_mean=[float(p) / tokens if tokens else 0.0 for p in self.prob_sum.tolist()],
            weight_mean=[float(w) / tokens if tokens else 0.0 for w in self.weight_sum.tolist()],
            weight_sum=float(self.weight_sum.sum()) / tokens if tokens else None,
            sample=sample,
        )


def calibrate(
    model: Any,
    spec: FamilySpec,
    batches: Iterable[Any],
    *,
    sample_tokens: int = DEFAULT_SAMPLE_TOKENS,
    seed: int = 0,
    on_batch: Callable[[float], None] | None = None,
    description: dict[str, Any] | None = None,
) -> Calibration:
    """Run ``batches`` through a model and collect per-layer calibration figures.

    Args:
        model: a runner (:class:`moetool.runner.StreamedModel`, one layer at a time, or
            :class:`moetool.runner.WholeModel`), or a transformers MoE causal LM of the family ``spec``.
        spec: its registry entry.
        batches: :class:`moetool.data.Batch` objects (right-padded, with attention masks).
        sample_tokens: tokens kept per layer for the computations that need hidden states.
        seed: seeds the sampling.
        on_batch: called with progress in tokens.
        description: what the data was (stored in the result).

    Raises:
        DatasetError-like MoetoolError: ``CALIBRATION_EMPTY`` when no token reached a router.
    """
    import time

    import torch

    from moetool.routing.observe import find_routers, router_top_k
    from moetool.runner.stream import StreamedModel, WholeModel

    runner = model if isinstance(model, (StreamedModel, WholeModel)) else WholeModel(model)
    config = runner.model.config.to_dict()
    routers = find_routers(runner.model, spec)
    accumulators: dict[int, _LayerAccumulator] = {}
    context: dict[str, torch.Tensor] = {}
    handles = []

    def record(layer: int, x: Any, logits: Any, indices: Any, weights: Any) -> None:
        x = x.reshape(-1, x.shape[-1])
        mask = context["mask"]
        acc = accumulators.get(layer)
        if acc is None:
            generator = torch.Generator().manual_seed(seed * 1_000_003 + layer)
            acc = accumulators[layer] = _LayerAccumulator(layer, logits.shape[-1], sample_tokens, generator)
        acc.update(x[mask], logits[mask], indices[mask], weights[mask])

    def hook_for(layer: int, top_k: int) -> Callable[..., None]:
        def hook(_module: Any, inputs: Any, output: Any) -> None:
            record(layer, inputs[0], *routing_decision(output, spec, config, top_k))

        return hook

    counted: dict[int, int] = {}

    def before_batch(index: int, batch: Any) -> None:
        context["mask"] = batch.attention_mask.reshape(-1).bool().to(runner.device)
        counted.setdefault(index, int(batch.attention_mask.sum()))

    start = time.perf_counter()
    try:
        if spec.router_output is RouterOutput.EXPERTS_INPUT:
            handles += _experts_input_hooks(runner.model, spec, routers, record)
        else:
            for layer, module in routers.items():
                capacity = spec.router_output.capacity_limited
                top_k = 0 if capacity else router_top_k(module, spec, runner.model.config)
                handles.append(module.register_forward_hook(hook_for(layer, top_k)))
        runner.forward_batches(batches, before_batch=before_batch, on_tokens=on_batch)
    finally:
        for handle in handles:
            handle.remove()
    tokens = sum(counted.values())
    if tokens == 0 or not accumulators:
        raise MoetoolError(
            "the calibration data gave no token to route",
            hint="pass a --dataset with more text, or a larger --max-tokens",
            code="CALIBRATION_EMPTY",
        )
    layers = {layer: accumulators[layer].freeze() for layer in sorted(accumulators)}
    return Calibration(
        source="dataset",
        tokens=tokens,
        layers=layers,
        description=dict(description or {}),
        seconds=time.perf_counter() - start,
    )


def _experts_input_hooks(model: Any, spec: FamilySpec, routers: dict[int, Any], record: Callable[..., None]) -> list:
    """Hooks for the families derived from transformers, whose choices are read where the model uses
    them (as profile-routing reads them): the router's logits, then the hidden states, top-k indices and
    weights its experts module is called with (``experts(hidden_states, top_k_index, top_k_weights)``)."""
    from moetool.routing.observe import experts_indices, find_modules, router_logits

    experts = find_modules(model, spec, "experts" if spec.stacks else spec.experts_module)
    pending: dict[int, Any] = {}

    def pair(layer: int) -> tuple[Callable[..., None], Callable[..., None]]:
        def on_router(_module: Any, _inputs: Any, output: Any) -> None:
            pending[layer] = router_logits(output)

        def on_experts(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            logits, indices = pending.pop(layer, None), experts_indices(args, kwargs)
            floats = [v for v in (*args, *kwargs.values()) if hasattr(v, "is_floating_point") and v.is_floating_point()]
            weights = next((v for v in floats if indices is not None and v.shape == indices.shape), None)
            if logits is None or indices is None or weights is None or not floats:
                raise MoetoolError(
                    f"layer {layer}: could not read the router logits, or the experts' inputs, top-k and weights",
                    hint="the installed transformers may lay this family out differently; please report it",
                )
            record(layer, floats[0], logits.reshape(-1, logits.shape[-1]), indices, weights)

        return on_router, on_experts

    handles = []
    for layer, router in routers.items():
        on_router, on_experts = pair(layer)
        handles.append(router.register_forward_hook(on_router))
        handles.append(experts[layer].register_forward_pre_hook(on_experts, with_kwargs=True))
    return handles


def from_stats(stats: RoutingStats, *, num_experts: int, moe_layers: Iterable[int], top_k: int) -> Calibration:
    """Calibration figures from a profile-routing stats file (no hidden-state sample).

    ``weight_sum`` is derived where the file allows: for top-1 and top-2 routing, the sum of the top-k
    softmax probabilities is ``top1_prob`` (plus ``top1_prob - top1_top2_margin``); it matters only for
    families that do not renormalise the top-k weights.

    Raises:
        UsageError: ``STATS_MISMATCH`` when the file was made for another expert count or other layers.
    """
    layers: dict[int, LayerCalibration] = {}
    expected = sorted(moe_layers)
    found = [layer.layer for layer in stats.layers]
    if stats.num_experts != num_experts or found != expected:
        raise UsageError(
            f"the stats file describes {stats.num_experts} experts in layers {found}, this model has "
            f"{num_experts} experts in layers {expected}",
            hint="pass the routing-stats.json that profile-routing wrote for this model",
            code="STATS_MISMATCH",
        )
    for layer in stats.layers:
        weight_sum = None
        if top_k == 1 and _finite(layer.top1_prob):
            weight_sum = layer.top1_prob
        elif top_k == 2 and _finite(layer.top1_prob) and _finite(layer.top1_top2_margin):
            weight_sum = 2 * layer.top1_prob - layer.top1_top2_margin
        layers[layer.layer] = LayerCalibration(
            layer=layer.layer,
            tokens=layer.tokens,
            counts=[int(c) for c in layer.counts],
            prob_mean=[float(p) if _finite(p) else 0.0 for p in layer.prob_mean],
            weight_sum=weight_sum,
        )
    return Calibration(source="stats", tokens=stats.tokens, layers=layers, description=dict(stats.dataset))


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)
