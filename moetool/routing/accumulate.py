"""Streaming routing statistics: fixed-size counters updated per batch, whatever the token count.

The update runs inside a forward hook at every router, once per layer per batch, so it is written for
the device the model runs on: no host-device synchronisation (no boolean-mask indexing, no ``.item()``,
no ``bincount``, whose CUDA kernel reads the maximum back to size its output, no shape that depends on
the data), padding excluded by masking rather than by selecting rows, and every integer counter updated
by ``index_add_`` into fixed-size buffers. Integer counts are exact; float sums are taken per batch
in float32 and accumulated across batches in float64. The numbers reach the host only when they are
read, at the end of a run. The token count comes from the host (:attr:`BatchContext.tokens`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

CAPACITY_FACTORS: tuple[float, ...] = (1.0, 1.25, 1.5, 2.0)


@dataclass
class BatchContext:
    """Per-token bookkeeping of the batch being run: which tokens are real, their window and domain.

    All tensors are flat over ``batch * seq_len`` positions, in the order the router sees them. Every
    MoE layer of the batch sees the same context: what can be derived from it once (offsets, capacities,
    the token count) is computed at the first layer and reused by the others.

    Attributes:
        tokens: the number of real tokens, counted on the host by the caller (the attention mask is
            there before it goes to the device). ``None``: counted from ``mask`` once per context, which
            on a GPU waits for the device once per batch.
    """

    mask: Any  # bool [N]
    window_ids: Any  # long [N]: index of the window (row) in this batch
    domain_ids: Any  # long [N]
    num_windows: int
    tokens: int | None = None
    _derived: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

    def real_tokens(self) -> int:
        """The number of real tokens (see ``tokens``)."""
        if self.tokens is None:
            self.tokens = int(self.mask.sum())
        return self.tokens

    def derived(self, num_experts: int, num_domains: int, top_k: int, device: Any) -> _Derived:
        """The per-batch tensors an accumulator of this shape needs (cached per shape and device)."""
        key = (num_experts, num_domains, top_k, str(device))
        hit = self._derived.get(key)
        if hit is None:
            hit = self._derived[key] = _Derived.build(self, num_experts, num_domains, top_k, device)
        return hit


@dataclass
class _Derived:
    """Per-batch tensors shared by the layers: where each token's assignments land in the counters.

    Attributes:
        invalid: ``[N, 1]`` padding positions.
        weight: ``[N, 1]`` float32, 1 for real tokens, 0 for padding.
        domain_base: ``[N, 1]`` offset of the token's domain row in the counters.
        coact_base: ``[N, 1]`` offset of the co-activation matrix in the counters.
        window_base: ``[N, 1]`` offset of the token's window row in the batch's per-window counts.
        (For padding these point at the dump bins, and the token's experts are replaced by expert 0,
        so that every key of a padding position is a dump bin.)
        capacity: ``[factors, windows, 1]`` expert capacity of each window at each capacity factor.
    """

    invalid: Any
    weight: Any
    domain_base: Any
    coact_base: Any
    window_base: Any
    capacity: Any

    @classmethod
    def build(cls, ctx: BatchContext, num_experts: int, num_domains: int, top_k: int, device: Any) -> _Derived:
        import torch

        mask = ctx.mask.to(device=device, dtype=torch.bool).reshape(-1, 1)
        windows = ctx.window_ids.to(device=device, dtype=torch.long).reshape(-1, 1)
        domains = ctx.domain_ids.to(device=device, dtype=torch.long).reshape(-1, 1)
        layout = _Layout(num_experts, num_domains)
        window_tokens = torch.zeros(ctx.num_windows, dtype=torch.long, device=device)
        window_tokens.index_add_(0, windows.reshape(-1), mask.reshape(-1).long())
        # Each window is a routing group with room for ceil(C * tokens * k / E) tokens per expert (the
        # float64 expression of the first implementation, kept so that drops stay identical). Python
        # floats, not a tensor of factors: building one on a GPU would be a synchronous copy.
        tokens = window_tokens.double()
        capacity = torch.stack([torch.ceil(tokens * f * top_k / num_experts) for f in CAPACITY_FACTORS]).long()
        return cls(
            invalid=~mask,
            weight=mask.float(),
            domain_base=(domains * num_experts).masked_fill_(~mask, layout.dump),
            coact_base=torch.full_like(windows, layout.coact_offset).masked_fill_(~mask, layout.dump),
            window_base=(windows * num_experts).masked_fill_(~mask, ctx.num_windows * num_experts),
            capacity=capacity[:, :, None],
        )


@dataclass(frozen=True)
class _Layout:
    """Where each integer counter lives in a layer's int64 counter vector: ``[domains * E]`` per-domain
    counts (their sum over domains is the per-expert count), ``[E * E]`` co-activation, and one dump bin
    that padding positions are sent to."""

    num_experts: int
    num_domains: int

    @property
    def coact_offset(self) -> int:
        return max(self.num_domains, 1) * self.num_experts

    @property
    def dump(self) -> int:
        return self.coact_offset + self.num_experts * self.num_experts

    @property
    def size(self) -> int:
        return self.dump + 1


class LayerAccumulator:
    """Counters of one MoE layer. Memory is O(experts^2 + domains * experts), independent of tokens.

    ``tokens``, ``assignments`` and ``top_k`` are host integers; every other counter is a fixed-size
    tensor on the device (so a caller may sum the tensors of ``vars(acc)`` across processes), read
    through properties that copy it to the host: ``counts``, ``domain_counts``, ``domain_tokens``,
    ``coactivation``, ``dropped``, ``prob_sum`` (CPU tensors) and ``z_sum``, ``top1_sum``,
    ``margin_sum`` (floats).
    """

    def __init__(self, num_experts: int, num_domains: int, device: Any, *, capacity_limited: bool = False) -> None:
        import torch

        self.num_experts = num_experts
        self.num_domains = num_domains
        self.device = torch.device(device)
        self.tokens = 0
        self.assignments = 0
        self.top_k = 0
        self._layout = _Layout(num_experts, num_domains)
        self._counts = torch.zeros(self._layout.size, dtype=torch.int64, device=self.device)
        self._dropped = torch.zeros(len(CAPACITY_FACTORS), dtype=torch.int64, device=self.device)
        # Float sums: per-expert probability mass, then z (logsumexp^2), top-1 and top-2 probabilities.
        self._sums = torch.zeros(num_experts + 3, dtype=torch.float64, device=self.device)
        # Capacity-limited families (Switch, NLLB-MoE): per expert, the assignments the model itself
        # processed after its own capacity limit (read as ``kept``; None for other families).
        self.capacity_limited = capacity_limited
        self._kept = torch.zeros(num_experts, dtype=torch.int64, device=self.device)

    # ------------------------------------------------------------------ hot path

    def update(self, logits: Any, indices: Any, ctx: BatchContext, kept: Any = None) -> None:
        """Add one router call's tokens (padding excluded). Never waits for the device (when the context
        carries its token count).

        Args:
            logits: ``[N, E]`` router logits (any float dtype; read, never modified).
            indices: ``[N, k]`` the distinct experts chosen for each token.
            ctx: the batch's context (``N`` positions).
            kept: ``[N, k]`` bool, for capacity-limited models: which chosen assignments the model
                processed (the others it dropped at an expert's capacity).
        """
        import torch

        n, num_experts = logits.shape
        if n != ctx.mask.shape[0]:
            raise RuntimeError(f"router saw {n} tokens but the batch has {ctx.mask.shape[0]} positions")
        if num_experts != self.num_experts:
            raise RuntimeError(f"router has {num_experts} experts, this layer's counters {self.num_experts}")
        tokens = ctx.real_tokens()
        if tokens == 0:
            return
        top_k = indices.shape[-1]
        self.tokens += tokens
        self.assignments += tokens * top_k
        self.top_k = top_k
        device = self.device
        logits = logits.to(device, non_blocking=True)
        idx = indices.to(device=device, dtype=torch.long, non_blocking=True)
        derived = ctx.derived(num_experts, self.num_domains, top_k, device)
        self._count(idx, derived, ctx.num_windows)
        self._float_sums(logits, derived)
        if kept is not None:
            # Padding rows weigh 0 (their indices are replaced by expert 0 like in _count).
            weight = kept.to(device=device, dtype=torch.long, non_blocking=True) * (~derived.invalid).long()
            self._kept.index_add_(0, torch.where(derived.invalid, 0, idx).view(-1), weight.view(-1))

    def _count(self, idx: Any, derived: _Derived, num_windows: int) -> None:
        """Domain counts and co-activation: one ``index_add_`` of ``k + k^2`` keys per token into the
        layer's counters; per-window counts: one into the batch's (every key of padding is a dump bin)."""
        import torch

        n, k = idx.shape
        e = self.num_experts
        idx = torch.where(derived.invalid, 0, idx)
        keys = torch.empty(n, k + k * k, dtype=torch.long, device=idx.device)
        torch.add(derived.domain_base, idx, out=keys[:, :k])
        # Co-activation as sparse pairs: token t adds 1 to (i, j) for every pair of its k experts (the
        # diagonal is the per-expert count): k^2 keys per token instead of an [N, E] one-hot and an
        # E x E matmul.
        rows = torch.add(derived.coact_base, idx, alpha=e)
        torch.add(rows[:, :, None], idx[:, None, :], out=keys[:, k:].view(n, k, k))
        self._counts.index_add_(0, keys.view(-1), _ones(keys.numel(), idx.device))
        # Capacity: assignments beyond each window's capacity are those a capacity-limited
        # implementation would drop.
        window = torch.zeros(num_windows * e + 1, dtype=torch.long, device=idx.device)
        window.index_add_(0, (derived.window_base + idx).view(-1), _ones(n * k, idx.device))
        per_window = window[: num_windows * e].view(1, num_windows, e)
        self._dropped += torch.sub(per_window, derived.capacity).clamp_(min=0).sum((1, 2))

    def _float_sums(self, logits: Any, derived: _Derived) -> None:
        """Probability mass per expert, z-loss, top-1 probability and top-1/top-2 margin, weighted by the
        mask and summed in float32 per batch (float64 across batches)."""
        import torch

        n, e = logits.shape
        # Padding rows are zeroed, not dropped: their logits may be anything, NaN included, and a zero
        # weight would not cancel a NaN.
        x = torch.where(derived.invalid, 0.0, logits.float())
        top = x.topk(min(2, e), dim=-1).values  # [N, 2]: the largest logit and the runner-up
        peak = top[:, :1]
        # Softmax by hand: its pieces give the other figures (softmax and log_softmax are also slow on
        # the CPU when the last dimension is small).
        probs = torch.sub(x, peak).exp_()  # unnormalised: the top expert's is exactly 1
        total = probs.sum(-1, keepdim=True)
        scale = derived.weight / total  # per token: normalises and drops padding
        self._sums[:e] += probs.mul_(scale).sum(0)
        # Per token: logsumexp^2 (z-loss), top-1 and top-2 probabilities, each times the token's total
        # so that the same scale applies.
        feats = torch.empty(n, 3, dtype=torch.float32, device=x.device)
        torch.sub(top, peak, out=feats[:, 1 : 1 + top.shape[1]]).exp_()
        if e < 2:
            feats[:, 2:] = 1.0  # one expert: probability 1, margin 0
        lse = total.log().add_(peak)
        torch.mul(lse, lse, out=feats[:, :1]).mul_(total)
        self._sums[e:] += feats.mul_(scale).sum(0)

    # ------------------------------------------------------------------ results (read at the end: copies)

    @property
    def domain_counts(self) -> Any:
        """``[max(domains, 1), E]`` int64 assignments per domain and expert (CPU)."""
        e, d = self.num_experts, max(self.num_domains, 1)
        return self._counts[: d * e].view(d, e).cpu()

    @property
    def counts(self) -> Any:
        """``[E]`` int64 assignments per expert (CPU)."""
        return self.domain_counts.sum(0)

    @property
    def domain_tokens(self) -> Any:
        """``[max(domains, 1)]`` int64 tokens per domain (CPU): each token adds k assignments to its row."""
        rows = self.domain_counts.sum(1)
        return rows // self.top_k if self.top_k else rows

    @property
    def coactivation(self) -> Any:
        """``[E, E]`` int64 tokens that chose both experts (CPU; the diagonal is ``counts``)."""
        e = self.num_experts
        return self._counts[self._layout.coact_offset : self._layout.dump].view(e, e).cpu()

    @property
    def kept(self) -> Any:
        """``[E]`` int64 assignments the model itself processed (CPU), or None unless capacity-limited."""
        return self._kept.cpu() if self.capacity_limited else None

    @property
    def dropped(self) -> Any:
        """``[len(CAPACITY_FACTORS)]`` int64 assignments beyond capacity (CPU)."""
        return self._dropped.cpu()

    @property
    def prob_sum(self) -> Any:
        """``[E]`` float64 router probability mass per expert (CPU)."""
        return self._sums[: self.num_experts].cpu()

    @property
    def z_sum(self) -> float:
        return float(self._sums[self.num_experts])

    @property
    def top1_sum(self) -> float:
        return float(self._sums[self.num_experts + 1])

    @property
    def margin_sum(self) -> float:
        return float(self._sums[self.num_experts + 1] - self._sums[self.num_experts + 2])


_ONES: dict[tuple[str, int], Any] = {}


def _ones(count: int, device: Any) -> Any:
    """A read-only int64 vector of ones of at least ``count`` elements (one allocation per device and size)."""
    import torch

    key = (str(device), count)
    hit = _ONES.get(key)
    if hit is None:
        if len(_ONES) > 16:  # batch shapes change rarely; keep the cache small
            _ONES.clear()
        hit = _ONES[key] = torch.ones(count, dtype=torch.int64, device=device)
    return hit


def switch_aux_loss(counts: list[int], prob_sum: list[float], tokens: int) -> float:
    """Switch-Transformer load-balancing loss N * sum_i f_i * P_i, as transformers computes it.

    ``f_i`` is the fraction of tokens routed to expert i (summed over the top-k slots) and ``P_i`` the
    mean router probability of expert i.
    """
    if tokens == 0:
        return math.nan
    num_experts = len(counts)
    return num_experts * sum((c / tokens) * (p / tokens) for c, p in zip(counts, prob_sum, strict=True))
