"""Streaming routing statistics: fixed-size counters updated per batch, whatever the token count."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

CAPACITY_FACTORS: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0)


@dataclass
class BatchContext:
    """Per-token bookkeeping of the batch being run: which tokens are real, their window and domain.

    All tensors are flat over ``batch * seq_len`` positions, in the order the router sees them.
    """

    mask: Any  # bool [N]
    window_ids: Any  # long [N]: index of the window (row) in this batch
    domain_ids: Any  # long [N]
    num_windows: int


class LayerAccumulator:
    """Counters of one MoE layer. Memory is O(experts^2 + domains * experts), independent of tokens."""

    def __init__(self, num_experts: int, num_domains: int, device: Any) -> None:
        import torch

        self.num_experts = num_experts
        self.num_domains = num_domains
        self.tokens = 0
        self.assignments = 0
        self.top_k = 0
        f64, i64 = torch.float64, torch.int64
        self.counts = torch.zeros(num_experts, dtype=i64, device=device)
        self.prob_sum = torch.zeros(num_experts, dtype=f64, device=device)
        self.coactivation = torch.zeros(num_experts, num_experts, dtype=f64, device=device)
        self.domain_counts = torch.zeros(max(num_domains, 1), num_experts, dtype=i64, device=device)
        self.domain_tokens = torch.zeros(max(num_domains, 1), dtype=i64, device=device)
        self.dropped = torch.zeros(len(CAPACITY_FACTORS), dtype=i64, device=device)
        self.z_sum = torch.zeros((), dtype=f64, device=device)
        self.top1_sum = torch.zeros((), dtype=f64, device=device)
        self.margin_sum = torch.zeros((), dtype=f64, device=device)
        # Capacity-limited families (Switch, NLLB-MoE): the assignments the model itself processed.
        self.kept: Any = None

    def update(self, logits: Any, indices: Any, ctx: BatchContext, kept: Any = None) -> None:
        """Add one router call's tokens (padding excluded).

        Args:
            logits: [positions, choices] router logits.
            indices: [positions, top_k] chosen experts.
            ctx: the batch's bookkeeping.
            kept: [positions, top_k] bool, for models that drop assignments beyond an expert capacity:
                which of the chosen assignments the model processed.
        """
        import torch

        num_experts = self.num_experts
        if logits.shape[0] != ctx.mask.shape[0]:
            raise RuntimeError(f"router saw {logits.shape[0]} tokens but the batch has {ctx.mask.shape[0]} positions")
        mask = ctx.mask
        logits = logits[mask].float()
        indices = indices[mask].long()
        windows = ctx.window_ids[mask]
        domains = ctx.domain_ids[mask]
        tokens, top_k = indices.shape
        if tokens == 0:
            return
        self.tokens += tokens
        self.assignments += tokens * top_k
        self.top_k = top_k
        flat = indices.reshape(-1)
        self.counts += torch.bincount(flat, minlength=num_experts)
        if kept is not None:
            if self.kept is None:
                self.kept = torch.zeros(num_experts, dtype=torch.int64, device=self.counts.device)
            self.kept += torch.bincount(indices[kept[mask].bool()].reshape(-1), minlength=num_experts)

        probs = torch.softmax(logits, dim=-1)
        self.prob_sum += probs.sum(0, dtype=torch.float64)
        self.z_sum += (torch.logsumexp(logits, dim=-1).double() ** 2).sum()
        if num_experts >= 2:
            top2 = probs.topk(2, dim=-1).values.double()
            self.top1_sum += top2[:, 0].sum()
            self.margin_sum += (top2[:, 0] - top2[:, 1]).sum()
        else:
            self.top1_sum += tokens

        chosen = torch.zeros(tokens, num_experts, dtype=torch.float32, device=logits.device)
        chosen.scatter_(1, indices, 1.0)
        self.coactivation += (chosen.T @ chosen).double()

        domain_of_choice = domains.repeat_interleave(top_k)
        self.domain_counts += torch.bincount(
            domain_of_choice * num_experts + flat, minlength=self.domain_counts.numel()
        ).view_as(self.domain_counts)
        self.domain_tokens += torch.bincount(domains, minlength=self.domain_tokens.numel())

        # Capacity: each window is a routing group with room for ceil(C * tokens * k / E) tokens per
        # expert; assignments beyond that are the ones a capacity-limited implementation would drop.
        window_of_choice = windows.repeat_interleave(top_k)
        per_window = torch.bincount(window_of_choice * num_experts + flat, minlength=ctx.num_windows * num_experts)
        per_window = per_window.view(ctx.num_windows, num_experts)
        window_tokens = torch.bincount(windows, minlength=ctx.num_windows)
        for i, factor in enumerate(CAPACITY_FACTORS):
            capacity = torch.ceil(window_tokens.double() * factor * top_k / num_experts).long()
            self.dropped[i] += (per_window - capacity[:, None]).clamp(min=0).sum()


def switch_aux_loss(counts: list[int], prob_sum: list[float], tokens: int) -> float:
    """Switch-Transformer load-balancing loss N * sum_i f_i * P_i, as transformers computes it.

    ``f_i`` is the fraction of tokens routed to expert i (summed over the top-k slots) and ``P_i`` the
    mean router probability of expert i.
    """
    if tokens == 0:
        return math.nan
    num_experts = len(counts)
    return num_experts * sum((c / tokens) * (p / tokens) for c, p in zip(counts, prob_sum, strict=True))
