"""Run a dataset through an MoE model and profile its routing (the library side of profile-routing)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from moetool.arch.registry import family_for_config, require_capability
from moetool.errors import UnsupportedArchitectureError
from moetool.routing.accumulate import BatchContext, LayerAccumulator
from moetool.routing.observe import RouterEvent, RouterObserver, capacity_info, decoder_inputs
from moetool.routing.stats import RoutingStats, layer_stats_from


def profile_routing(
    model: Any,
    batches: Iterable[Any],
    *,
    domains: list[str] | None = None,
    name: str = "",
    dataset: dict[str, Any] | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> RoutingStats:
    """Profile the expert choices ``model`` makes on ``batches``.

    Args:
        model: a transformers MoE causal LM (eval mode).
        batches: :class:`moetool.data.Batch` objects (right-padded, with attention masks).
        domains: the domain names that batches may carry, for the per-domain breakdown.
        name: how to name the model in the result.
        dataset: a description of the data, stored in the result.
        on_batch: called with the number of real tokens after each batch (progress reporting).

    Raises:
        UnsupportedArchitectureError: the model is not an MoE of a registered family.
    """
    import torch

    config = model.config.to_dict()
    spec = family_for_config(config)
    require_capability(spec, "profile-routing")
    if not spec.is_moe:
        raise UnsupportedArchitectureError(
            f"{name or 'the model'} is a dense {spec.name} model: it has no router to profile",
            code="NOT_MOE",
        )
    domain_names = list(domains or [])
    domain_index = {d: i for i, d in enumerate(domain_names)}
    device = next(model.parameters()).device
    accumulators: dict[int, LayerAccumulator] = {}
    context: dict[str, BatchContext] = {}

    def on_router(event: RouterEvent) -> None:
        acc = accumulators.get(event.layer)
        if acc is None:
            acc = accumulators[event.layer] = LayerAccumulator(event.logits.shape[-1], len(domain_names), device)
        acc.update(event.logits, event.indices, context["batch"], event.kept)

    tokens = 0
    start = time.perf_counter()
    with RouterObserver(model, spec, on_router) as observer, torch.inference_mode():
        for batch in batches:
            input_ids = batch.input_ids.to(device)
            mask = batch.attention_mask.to(device)
            rows, length = input_ids.shape
            domain_ids = torch.tensor(
                [domain_index.get(d, 0) if d is not None else 0 for d in batch.domains], device=device
            )
            context["batch"] = BatchContext(
                mask=mask.reshape(-1).bool(),
                window_ids=torch.arange(rows, device=device).repeat_interleave(length),
                domain_ids=domain_ids.repeat_interleave(length),
                num_windows=rows,
            )
            model(input_ids=input_ids, attention_mask=mask, use_cache=False, **decoder_inputs(model, input_ids, mask))
            batch_tokens = int(mask.sum())
            tokens += batch_tokens
            if on_batch is not None:
                on_batch(batch_tokens)
        layers = observer.layers
    elapsed = time.perf_counter() - start

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
        capacity=capacity_info(spec, model.config),
    )
