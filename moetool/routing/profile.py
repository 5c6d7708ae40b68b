"""Run a dataset through an MoE model and profile its routing (the library side of profile-routing)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import Any

from moetool.arch.registry import family_for_config, require_capability
from moetool.errors import UnsupportedArchitectureError
from moetool.progress import Progress, token_counter
from moetool.routing.accumulate import BatchContext, LayerAccumulator
from moetool.routing.observe import capacity_info
from moetool.routing.stats import RoutingStats, layer_stats_from


def profile_routing(
    model: Any,
    batches: Iterable[Any],
    *,
    domains: list[str] | None = None,
    name: str = "",
    dataset: dict[str, Any] | None = None,
    progress: Progress | None = None,
    expected_tokens: int | None = None,
) -> RoutingStats:
    """Profile the expert choices a model makes on ``batches``.

    Args:
        model: a runner (:class:`moetool.runner.StreamedModel`, layer by layer, or
            :class:`moetool.runner.WholeModel`), or a transformers MoE causal LM in eval mode.
        batches: :class:`moetool.data.Batch` objects (right-padded, with attention masks).
        domains: the domain names that batches may carry, for the per-domain breakdown.
        name: how to name the model in the result.
        dataset: a description of the data, stored in the result.
        progress: reports ``routing`` in tokens (a streamed run reports each layer's share).
        expected_tokens: the tokens ``batches`` hold, when known (the progress total).

    Raises:
        UnsupportedArchitectureError: the model is not an MoE of a registered family.
    """
    import torch

    from moetool.runner.observe import Observer, RouteEvent, as_runner

    runner = as_runner(model)
    config = runner.model.config.to_dict()
    spec = family_for_config(config)
    require_capability(spec, "profile-routing")
    if not spec.is_moe:
        raise UnsupportedArchitectureError(
            f"{name or 'the model'} is a dense {spec.name} model: it has no router to profile",
            code="NOT_MOE",
        )
    domain_names = list(domains or [])
    # Capacity-limited models (Switch, NLLB-MoE): what the model itself keeps is counted too.
    capacity = capacity_info(spec, runner.model.config)
    domain_index = {d: i for i, d in enumerate(domain_names)}
    device = runner.device
    accumulators: dict[int, LayerAccumulator] = {}
    contexts: dict[int, BatchContext] = {}
    current: dict[str, BatchContext] = {}

    def on_route(event: RouteEvent) -> None:
        acc = accumulators.get(event.layer)
        if acc is None:
            acc = accumulators[event.layer] = LayerAccumulator(
                event.logits.shape[-1], len(domain_names), device, capacity_limited=capacity is not None
            )
        acc.update(event.logits, event.indices, current["batch"], event.kept)

    def before_batch(index: int, batch: Any) -> None:
        context = contexts.get(index)
        if context is None:
            rows, length = batch.input_ids.shape
            domain_ids = torch.tensor(
                [domain_index.get(d, 0) if d is not None else 0 for d in batch.domains], device=device
            )
            context = contexts[index] = BatchContext(
                mask=observer.mask,  # the observer's device mask of this batch
                window_ids=torch.arange(rows, device=device).repeat_interleave(length),
                domain_ids=domain_ids.repeat_interleave(length),
                num_windows=rows,
                tokens=int(batch.attention_mask.sum()),  # on the host: no device sync per layer
            )
        current["batch"] = context

    from moetool.runner.dist import current_ranks

    ranks = current_ranks(str(device))
    start = time.perf_counter()
    observer = Observer(runner, spec).on_route(on_route)
    observer.run(
        ranks.shard(batches),
        before_batch=before_batch,
        on_tokens=token_counter(progress, "routing", expected_tokens),
        after_segment=contexts.clear,
    )
    layers = observer.layers
    elapsed = time.perf_counter() - start
    tokens = observer.tokens
    if ranks.world > 1:
        tokens = _sum_across(ranks, accumulators, tokens, len(domain_names), device, capacity is not None)

    stats_layers = [
        layer_stats_from(layer, accumulators[layer], domain_names) for layer in layers if layer in accumulators
    ]
    domain_tokens: dict[str, int] = {}
    if domain_names and stats_layers:
        first = accumulators[layers[0]]
        domain_tokens = {d: int(first.domain_tokens[i]) for i, d in enumerate(domain_names)}
    return RoutingStats(
        model=name,
        model_type=config.get("model_type"),
        family=spec.name,
        routing=spec.routing.rule.value,
        num_experts=stats_layers[0].num_experts if stats_layers else 0,
        top_k=stats_layers[0].top_k if stats_layers else 0,
        tokens=tokens,
        layers=stats_layers,
        domain_tokens=domain_tokens,
        dataset=dict(dataset or {}),
        wall_seconds=elapsed,
        capacity=capacity,
    )


def _sum_across(
    ranks: Any,
    accumulators: dict[int, LayerAccumulator],
    tokens: int,
    domains: int,
    device: Any,
    capacity_limited: bool = False,
) -> int:
    """Sum every process's counters (each ran a share of the batches); returns the total token count.

    A process that saw no batch has no counters yet: it makes empty ones of the right size first, so every
    process takes part in every sum.
    """
    import torch

    sizes: dict[int, int] = {}
    for part in ranks.gather({layer: acc.num_experts for layer, acc in accumulators.items()}):
        sizes.update(part)
    for layer, experts in sizes.items():
        if layer not in accumulators:
            accumulators[layer] = LayerAccumulator(experts, domains, device, capacity_limited=capacity_limited)
    for layer in sorted(accumulators):
        acc = accumulators[layer]
        for value in vars(acc).values():
            if isinstance(value, torch.Tensor):
                ranks.sum_(value)
        acc.tokens = ranks.sum_int(acc.tokens)
        acc.assignments = ranks.sum_int(acc.assignments)
        acc.top_k = max(ranks.gather(acc.top_k))
    return ranks.sum_int(tokens)
