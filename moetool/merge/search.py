"""Choose the experts to keep by the layer output they reproduce (exhaustive search for small N, as in NAEE).

Frequency, soft frequency and REAP rank experts one at a time. What matters is the layer: after
pruning, a token is routed among the kept experts (the family's own rule, applied to the kept router
rows) and the layer outputs ``sum_{j in top-k} w_j E_j(x)``. :func:`best_subset` evaluates that output
for candidate sets of M experts on calibration tokens and keeps the set whose output is closest to the
original layer's (Lu et al., 2024, "Not All Experts are Equal", which enumerates the sets). Every set
is tried when there are at most ``limit`` of them (70 for 8 -> 4); otherwise experts are removed one at a
time, each time the one whose removal hurts least (greedy backward elimination).

Per token, with ``a`` the routing weights over the experts (zero outside the top-k), the squared error
is ``a^T G a - 2 a.b + |y|^2`` with ``G = o o^T`` and ``b = o y`` precomputed from the experts' outputs
``o``, so a candidate costs ``O(tokens * N^2)`` and never touches the hidden size.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from moetool.merge.router import RoutingRule

#: Largest number of candidate sets tried exhaustively.
EXHAUSTIVE_LIMIT = 2000


class LayerOutputs:
    """Precomputed products of the experts' outputs ``o`` ``[n, N, H]`` and the layer's output ``y`` ``[n, H]``."""

    def __init__(self, outputs: torch.Tensor, target: torch.Tensor, logits: torch.Tensor) -> None:
        import torch

        outs = outputs.double()
        goal = target.double()
        self.gram = torch.einsum("nmh,nlh->nml", outs, outs)
        self.cross = torch.einsum("nmh,nh->nm", outs, goal)
        self.const = (goal**2).sum(dim=-1)
        self.logits = logits.float()
        self.norm = float(self.const.mean()) or 1.0

    def error(self, subset: Sequence[int], rule: RoutingRule) -> float:
        """Relative squared error of the layer output when only ``subset`` is kept (routing re-applied)."""
        import dataclasses

        import torch

        idx = torch.as_tensor(list(subset), dtype=torch.long)
        bias = rule.bias[idx] if rule.bias is not None else None
        sub_rule = dataclasses.replace(rule, top_k=min(rule.top_k, len(subset)), bias=bias)
        with torch.no_grad():
            indices, weights = sub_rule.weights(self.logits[:, idx])
            dense = torch.zeros(self.logits.shape[0], len(subset), dtype=torch.float64)
            dense.scatter_(1, indices, weights.double())
            gram = self.gram[:, idx][:, :, idx]
            quadratic = torch.einsum("nm,nml,nl->n", dense, gram, dense)
            total = quadratic - 2 * (dense * self.cross[:, idx]).sum(dim=-1) + self.const
        return float(total.mean()) / self.norm


def best_subset(
    layer: LayerOutputs, num_experts: int, m: int, rule: RoutingRule, *, limit: int = EXHAUSTIVE_LIMIT
) -> tuple[list[int], float, bool]:
    """The ``m`` experts whose pruned layer reproduces the original output best.

    Returns:
        ``(kept, error, exhaustive)``: the kept experts (ascending), the relative squared error of the
        layer output with them, and whether every set was tried.
    """
    if math.comb(num_experts, m) <= limit:
        best: tuple[float, list[int]] | None = None
        for subset in itertools.combinations(range(num_experts), m):
            err = layer.error(subset, rule)
            if best is None or err < best[0]:
                best = (err, list(subset))
        assert best is not None
        return best[1], best[0], True
    kept = list(range(num_experts))
    err = layer.error(kept, rule)
    while len(kept) > m:
        trials = [(layer.error([e for e in kept if e != drop], rule), drop) for drop in kept]
        err, drop = min(trials)
        kept.remove(drop)
    return kept, err, False
