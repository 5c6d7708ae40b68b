"""Router initialisation for upcycled layers: random, zeros, or k-means of the dense model's hidden states.

Every choice keeps the model exact while the experts are identical copies, as long as the G shards
of one copy are chosen together: the router's row of a copy is repeated G times (the shards then
have bit-identical logits) and the rows of different copies differ (random, k-means) so that no tie
between copies can split a copy's shards. ``zeros`` ties everything and is only allowed for G = 1,
where any choice among identical experts is exact.

k-means: the dense model runs over a dataset through the one observation path
(:class:`moetool.runner.observe.Observer`), the inputs of each MoE layer's MLP are collected, and
spherical k-means (cosine assignment, a few Lloyd iterations from a seeded k-means++ start) gives E
centroids per layer. Router rows are the unit centroids divided by the mean
hidden-state norm, so that a logit is about the cosine between the token and the centroid: a token
goes first to the copy whose cluster it is closest to.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from moetool.errors import DatasetError
from moetool.upcycle.symmetry import generator

if TYPE_CHECKING:
    import torch

    from moetool.upcycle.plan import UpcyclePlan

KMEANS_ITERATIONS = 25


def router_rows(plan: UpcyclePlan, layer: int, centroids: torch.Tensor | None = None) -> torch.Tensor:
    """The float32 router weight ``[E*G, H]`` of one MoE layer.

    Args:
        plan: the plan (router init, seed, std, granularity).
        layer: the layer (seeds the random draw).
        centroids: ``[E, H]`` rows from :func:`kmeans_routers` (``router_init == "kmeans"``).
    """
    import torch

    opts = plan.options
    copies, hidden = opts.num_experts, plan.hidden_size
    if opts.router_init == "zeros":
        rows = torch.zeros(copies, hidden)
    elif opts.router_init == "kmeans":
        if centroids is None:
            raise ValueError(f"no k-means centroids for layer {layer}")
        rows = centroids.float()
    else:
        rows = torch.randn(copies, hidden, generator=generator(opts.seed, "router", layer)) * plan.router_std
    # The G shards of one copy share its row: identical logits, chosen together.
    return rows.repeat_interleave(opts.granularity, dim=0)


def spherical_kmeans(points: torch.Tensor, k: int, *, seed: int, iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """Unit-norm centroids ``[k, H]`` of unit-norm points ``[N, H]`` (cosine k-means, k-means++ start).

    Deterministic for a seed. An emptied cluster is re-seeded with the point farthest from its centroid.
    """
    import torch

    gen = generator(seed, "kmeans")
    n = points.shape[0]
    first = int(torch.randint(n, (1,), generator=gen))
    centroids = [points[first]]
    best = 1 - points @ points[first]
    for _ in range(1, k):
        weights = best.clamp_min(0) ** 2
        pick = int(torch.multinomial(weights, 1, generator=gen)) if weights.sum() > 0 else int(torch.argmax(best))
        centroids.append(points[pick])
        best = torch.minimum(best, 1 - points @ points[pick])
    c = torch.stack(centroids)
    for _ in range(iterations):
        similarity = points @ c.T
        assign = similarity.argmax(dim=1)
        sums = torch.zeros_like(c).index_add_(0, assign, points)
        counts = torch.bincount(assign, minlength=k)
        for empty in (counts == 0).nonzero().flatten().tolist():
            far = int(similarity.max(dim=1).values.argmin())
            sums[empty] = points[far]
        new = torch.nn.functional.normalize(sums, dim=1)
        if torch.equal(new, c):
            break
        c = new
    return c


def kmeans_routers(
    plan: UpcyclePlan,
    batches: Iterable[Any],
    *,
    model: Any,
    max_tokens: int,
    on_tokens: Callable[[int], None] | None = None,
) -> dict[int, torch.Tensor]:
    """Router rows ``[E, H]`` per MoE layer from k-means of the dense model's MLP inputs.

    Args:
        plan: the plan (MoE layers, E, seed).
        batches: token batches (:func:`moetool.data.iter_batches`).
        model: the dense model: a runner (:class:`moetool.runner.StreamedModel`, one layer at a time, or
            :class:`moetool.runner.WholeModel`) or a loaded transformers model.
        max_tokens: stop collecting after this many tokens.
        on_tokens: progress callback.

    Raises:
        DatasetError: ``DATASET_EMPTY`` when the dataset gives fewer tokens than there are experts.
    """
    import torch

    from moetool.runner.observe import InputEvent, Observer

    observer = Observer(model, plan.source_family)
    collected: dict[int, list[torch.Tensor]] = {layer: [] for layer in plan.moe_layers}

    def on_mlp_input(event: InputEvent) -> None:
        collected[event.key].append(event.masked(event.args[0]).float().cpu())

    observer.on_input(observer.mlp_modules(plan.moe_layers), on_mlp_input)
    seen = 0

    def limited() -> Iterable[Any]:
        nonlocal seen
        for batch in batches:
            yield batch
            seen += int(batch.attention_mask.sum())
            if seen >= max_tokens:
                return

    observer.run(limited(), on_tokens=on_tokens)
    if seen < plan.options.num_experts:
        raise DatasetError(
            f"the dataset gave {seen} tokens; k-means router init needs at least one per expert "
            f"({plan.options.num_experts})",
            hint="pass a larger --dataset or raise --max-tokens",
            code="DATASET_EMPTY",
        )
    routers: dict[int, torch.Tensor] = {}
    for layer, parts in collected.items():
        hidden = torch.cat(parts)[:max_tokens]
        norms = hidden.norm(dim=1)
        unit = torch.nn.functional.normalize(hidden, dim=1)
        centroids = spherical_kmeans(unit, plan.options.num_experts, seed=plan.options.seed * 7919 + layer)
        routers[layer] = centroids / norms.mean().clamp_min(1e-6)
        collected[layer] = []
    return routers
