"""The router of a reduced layer: rows dropped or merged, optionally refitted to the old routing.

* Pruning keeps the rows (and per-expert vectors such as DeepSeek's ``e_score_correction_bias``) of the
  kept experts: the softmax over the kept logits is then exactly the old distribution renormalised
  over them.
* Merging replaces a group's rows by their weighted average (the weights used for the experts).
* :func:`refit_to_outputs` (``--refit-router``) fits the new rows on calibration hidden states so that
  the reduced layer's routed output, ``sum_{j in top-k} w_j(x) E'_j(x)`` with the family's own routing
  rule, matches what the original layer's experts added: the router learns which of the new experts
  best stand in for the old ones on each token. Adam from the dropped/merged rows, a few hundred steps.
* :func:`refit` is the fallback where the router weight scales the expert's input (Llama-4), so the
  layer output is not linear in the experts' outputs: it matches the old routing distribution
  aggregated onto the new experts (cross-entropy for softmax routers, binary cross-entropy for
  sigmoid routers), a pruned expert's share going to the kept expert most like it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def select_rows(tensor: torch.Tensor, kept: Sequence[int]) -> torch.Tensor:
    """Rows ``kept`` of a per-expert tensor (router weight ``[N, H]`` or a vector ``[N]``)."""
    import torch

    return tensor[torch.as_tensor(list(kept), dtype=torch.long)]


def merge_rows(
    tensor: torch.Tensor, groups: Sequence[Sequence[int]], weights: Sequence[Sequence[float]]
) -> torch.Tensor:
    """One weighted-average row per group."""
    import torch

    rows = []
    for members, w in zip(groups, weights, strict=True):
        acc = torch.zeros_like(tensor[0], dtype=torch.float32)
        for e, we in zip(members, w, strict=True):
            acc = acc + we * tensor[e].float()
        rows.append(acc)
    return torch.stack(rows).to(tensor.dtype)


def aggregate(probs: torch.Tensor, assignment: Sequence[int], m: int) -> torch.Tensor:
    """Sum the columns of ``probs`` ``[n, N]`` into ``m`` columns: old expert ``e`` goes to ``assignment[e]``."""
    import torch

    index = torch.as_tensor(list(assignment), dtype=torch.long)
    out = torch.zeros(probs.shape[0], m, dtype=probs.dtype)
    out.index_add_(1, index, probs)
    return out


def refit(
    x: torch.Tensor,
    old_logits: torch.Tensor,
    assignment: Sequence[int],
    init: torch.Tensor,
    *,
    sigmoid: bool = False,
    iterations: int = 300,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Fit new router rows to the old routing aggregated per new expert.

    Args:
        x: calibration hidden states at the router input ``[n, H]``.
        old_logits: the old router's logits on them ``[n, N]``.
        assignment: for each old expert, the new expert that takes its tokens.
        init: the starting rows ``[M, H]`` (the dropped/merged rows).
        sigmoid: the family scores experts with a sigmoid (DeepSeek-V3, MiniMax, Llama-4) rather than a
            softmax.
        iterations: L-BFGS iterations.

    Returns:
        The fitted rows (dtype of ``init``) and ``{"loss_before", "loss_after"}``.
    """
    import torch

    m = init.shape[0]
    xs = x.float()
    with torch.no_grad():
        if sigmoid:
            p_old = torch.sigmoid(old_logits.float())
            # P(some member fires), treating members as independent.
            miss = torch.ones(xs.shape[0], m)
            for e, j in enumerate(assignment):
                miss[:, j] *= 1 - p_old[:, e]
            target = 1 - miss
        else:
            target = aggregate(torch.softmax(old_logits.float(), dim=-1), assignment, m)
    weight = init.detach().float().clone().requires_grad_(True)

    def loss_fn() -> torch.Tensor:
        logits = xs @ weight.T
        if sigmoid:
            return torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
        return -(target * torch.log_softmax(logits, dim=-1)).sum(dim=-1).mean()

    with torch.no_grad():
        before = float(loss_fn())
    optimizer = torch.optim.LBFGS([weight], lr=1.0, max_iter=iterations, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    with torch.no_grad():
        after = float(loss_fn())
    if not after <= before:  # never return something worse than where we started
        return init, {"loss_before": before, "loss_after": before}
    return weight.detach().to(init.dtype), {"loss_before": before, "loss_after": after}


@dataclass(frozen=True)
class RoutingRule:
    """How a router's logits become expert choices and weights (for :func:`refit_to_outputs`).

    Attributes:
        kind: ``softmax`` (softmax over all experts, then top-k), ``topk_softmax`` (top-k logits, softmax
            over them), or ``sigmoid`` (sigmoid scores, top-k of scores plus ``bias``).
        top_k: experts per token.
        renormalize: divide the chosen weights by their sum (``softmax``/``sigmoid``).
        scaling: a constant factor on the weights (DeepSeek's ``routed_scaling_factor``).
        bias: a per-expert selection bias (DeepSeek-V3's correction bias), not part of the weights.
    """

    kind: str
    top_k: int
    renormalize: bool = True
    scaling: float = 1.0
    bias: torch.Tensor | None = None

    def weights(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(indices, weights)`` ``[n, k]``; the weights are differentiable in ``logits``."""
        import torch

        if self.kind == "topk_softmax":
            indices = torch.topk(logits.detach(), self.top_k, dim=-1).indices
            return indices, torch.softmax(logits.gather(-1, indices), dim=-1) * self.scaling
        scores = torch.sigmoid(logits) if self.kind == "sigmoid" else torch.softmax(logits, dim=-1)
        choice = scores.detach() + (self.bias if self.bias is not None else 0)
        indices = torch.topk(choice, self.top_k, dim=-1).indices
        chosen = scores.gather(-1, indices)
        if self.renormalize:
            chosen = chosen / (chosen.sum(dim=-1, keepdim=True) + 1e-20)
        return indices, chosen * self.scaling

    def soft_weights(self, logits: torch.Tensor) -> torch.Tensor:
        """Weights over every expert ``[n, M]`` (no top-k): a smooth stand-in whose gradient reaches every row."""
        import torch

        if self.kind == "sigmoid":
            scores = torch.sigmoid(logits)
            scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
        else:
            scores = torch.softmax(logits, dim=-1)
        return scores * self.scaling


def refit_to_outputs(
    x: torch.Tensor,
    outputs: torch.Tensor,
    target: torch.Tensor,
    init: torch.Tensor,
    rule: RoutingRule,
    *,
    steps: int = 300,
    lr: float = 0.01,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Fit router rows so that the reduced layer's routed output matches the original layer's.

    The reduced layer computes ``sum_{j in topk} w_j(x) E'_j(x)``; with the new experts' outputs
    ``E'_j(x)`` fixed, only the router changes. The relative squared error to the original layer's routed
    output is minimised with Adam; the top-k choice is recomputed every step, but it has no gradient
    (with top-1 and renormalised weights, none at all), so the same error of the all-experts mixture
    ``sum_j p_j(x) E'_j(x)`` is added as a smooth surrogate that moves probability towards the experts
    that reproduce the output. The rows with the best true (top-k) error are returned, never worse
    than ``init``.

    Args:
        x: calibration hidden states ``[n, H]``.
        outputs: the new experts' outputs on them ``[n, M, H]``.
        target: the original layer's routed output ``[n, H]``.
        init: starting rows ``[M, H]``.
        rule: the family's routing rule.
        steps / lr: Adam iterations and learning rate.

    Returns:
        The rows (dtype of ``init``) and ``{"loss_before", "loss_after"}`` (relative squared errors).
    """
    import torch

    xs = x.float()
    outs = outputs.double()
    goal = target.double()
    # ||sum_j a_j o_j - y||^2 = a^T G a - 2 a.b + |y|^2 per token, with a the (sparse) routing weights:
    # precomputing G = o o^T and b = o y makes each step O(tokens * M^2) instead of O(tokens * k * H).
    gram = torch.einsum("nmh,nlh->nml", outs, outs).float()
    cross = torch.einsum("nmh,nh->nm", outs, goal).float()
    const = (goal**2).sum(dim=-1).float()
    norm = float(const.mean()) or 1.0
    weight = init.detach().float().clone().requires_grad_(True)

    def error(a: torch.Tensor) -> torch.Tensor:
        quadratic = torch.einsum("nm,nml,nl->n", a, gram, a)
        return (quadratic - 2 * (a * cross).sum(dim=-1) + const).mean() / norm

    def loss_fn() -> torch.Tensor:
        """The true top-k error."""
        indices, w = rule.weights(xs @ weight.T)
        return error(torch.zeros(xs.shape[0], gram.shape[1], dtype=w.dtype).scatter(1, indices, w))

    with torch.no_grad():
        before = float(loss_fn())
    best, best_loss = init.detach().float().clone(), before
    optimizer = torch.optim.Adam([weight], lr=lr * (float(init.float().norm(dim=-1).mean()) or 1.0))
    with torch.enable_grad():
        for _ in range(steps):
            optimizer.zero_grad()
            logits = xs @ weight.T
            indices, w = rule.weights(logits)
            loss = error(torch.zeros(xs.shape[0], gram.shape[1], dtype=w.dtype).scatter(1, indices, w))
            value = float(loss.detach())
            if value < best_loss:
                best_loss, best = value, weight.detach().clone()
            (loss + error(rule.soft_weights(logits))).backward()
            optimizer.step()
    with torch.no_grad():
        final = float(loss_fn())
    if final < best_loss:
        best_loss, best = final, weight.detach().clone()
    return best.to(init.dtype), {"loss_before": before, "loss_after": best_loss}
