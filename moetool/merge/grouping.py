"""Which experts become one: M groups over a layer's N experts, from frequencies and similarities.

Two ways to form groups, both pure functions of small matrices:

* :func:`around_anchors` (MC-SMoE): the M most important experts are the anchors; every other expert
  joins the anchor it is most similar to.
* :func:`cluster` : average-linkage agglomerative clustering on a similarity matrix down to M groups,
  with no anchor fixed in advance.

Similarities: :func:`row_similarity` (cosine of router rows: experts the router treats alike),
:func:`column_similarity` (cosine of centred router-logit columns over calibration tokens, MC-SMoE's
default) and the same function over flattened expert outputs (experts that compute alike).
Each group lists its members with the most important first; that member is the one the others are
aligned to.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def top_m(scores: Sequence[float], m: int) -> list[int]:
    """Indices of the ``m`` highest scores (ties broken by lower index), in ascending index order."""
    order = sorted(range(len(scores)), key=lambda e: (-scores[e], e))
    return sorted(order[:m])


def row_similarity(rows: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between the rows of ``rows`` ``[N, D]`` -> ``[N, N]``."""
    import torch

    unit = torch.nn.functional.normalize(rows.double(), dim=-1)
    return unit @ unit.T


def column_similarity(values: torch.Tensor) -> torch.Tensor:
    """Cosine similarity between centred columns of ``values`` ``[n, N]`` -> ``[N, N]`` (Pearson correlation)."""
    centred = values.double() - values.double().mean(dim=0, keepdim=True)
    return row_similarity(centred.T)


def _order_members(members: list[int], scores: Sequence[float]) -> list[int]:
    return sorted(members, key=lambda e: (-scores[e], e))


def around_anchors(similarity: torch.Tensor, scores: Sequence[float], m: int) -> list[list[int]]:
    """Groups around the ``m`` most important experts (MC-SMoE's grouping).

    Args:
        similarity: ``[N, N]`` expert similarity (higher = more alike).
        scores: importance per expert (frequency, usually).
        m: the number of groups.

    Returns:
        ``m`` groups ordered by their anchor's index; in each, the anchor first, then the experts
        assigned to it by decreasing importance.
    """
    anchors = top_m(scores, m)
    groups = {a: [a] for a in anchors}
    for e in range(len(scores)):
        if e in groups:
            continue
        best = max(anchors, key=lambda a: (float(similarity[e, a]), -a))
        groups[best].append(e)
    return [_order_members(groups[a], scores) for a in anchors]


def cluster(similarity: torch.Tensor, scores: Sequence[float], m: int) -> list[list[int]]:
    """Average-linkage agglomerative clustering down to ``m`` groups.

    Args:
        similarity: ``[N, N]`` expert similarity.
        scores: importance per expert, to order members (the most important leads its group).
        m: the number of groups.

    Returns:
        ``m`` groups, ordered by their leading member's index.
    """
    n = len(scores)
    sim = similarity.double().clone()
    groups: list[list[int]] = [[e] for e in range(n)]
    while len(groups) > m:
        best: tuple[float, int, int] | None = None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                link = float(sim[groups[i]][:, groups[j]].mean())
                if best is None or link > best[0]:
                    best = (link, i, j)
        assert best is not None
        _, i, j = best
        groups[i] = groups[i] + groups[j]
        del groups[j]
    ordered = [_order_members(g, scores) for g in groups]
    return sorted(ordered, key=lambda g: g[0])


def weights_within(groups: list[list[int]], scores: Sequence[float]) -> list[list[float]]:
    """Averaging weights inside each group, proportional to ``scores`` (uniform when all are zero)."""
    out = []
    for group in groups:
        total = sum(max(float(scores[e]), 0.0) for e in group)
        if total <= 0:
            out.append([1.0 / len(group)] * len(group))
        else:
            out.append([max(float(scores[e]), 0.0) / total for e in group])
    return out
