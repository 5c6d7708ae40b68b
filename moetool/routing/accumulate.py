"""Streaming routing statistics: fixed-size counters updated per batch, whatever the token count.

The update runs inside a forward hook at every router, once per layer per batch, so it is written for
the device the model runs on: no host-device synchronisation (no boolean-mask indexing, no ``.item()``,
no ``bincount``, whose CUDA kernel reads the maximum back to size its output, no shape that depends on
the data), padding excluded by masking rather than by selecting rows, and every integer counter updated
by one ``index_add_`` into one buffer. Integer counts are exact; float sums are taken per batch in
float32 and accumulated across batches in float64. The numbers reach the host only when they are read
(:meth:`LayerAccumulator.snapshot`, at the end of a run).
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
    MoE layer of the batch sees the same context: what can be derived from it once (offsets, capacities)
    is computed at the first layer and reused by the others.
    """

    mask: Any  # bool [N]
    window_ids: Any  # long [N]: index of the window (row) in this batch
    domain_ids: Any  # long [N]
    num_windows: int
    _derived: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)

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
        bases: ``[N, 2, 1]`` offsets of the token's domain row and window row in the counter buffer.
        coact_base: ``[N, 1]`` offset of the co-activation matrix in the buffer.
        (For padding all three point at the dump bin, and the token's experts are replaced by expert 0,
        so that every key of a padding position is the dump bin.)
        capacity: ``[factors, windows, 1]`` expert capacity of each window at each capacity factor.
    """

    invalid: Any
    weight: Any
    bases: Any
    coact_base: Any
    capacity: Any

    @classmethod
    def build(cls, ctx: BatchContext, num_experts: int, num_domains: int, top_k: int, device: Any) -> _Derived:
        import torch

        mask = ctx.mask.to(device=device, dtype=torch.bool).reshape(-1, 1)
        windows = ctx.window_ids.to(device=device, dtype=torch.long).reshape(-1, 1)
        domains = ctx.domain_ids.to(device=device, dtype=torch.long).reshape(-1, 1)
        layout = _Layout(num_experts, num_domains, ctx.num_windows)
        dump = layout.dump
        bases = torch.cat([domains * num_experts, windows * num_experts + layout.window_offset], dim=1)
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
            bases=bases.masked_fill(~mask, dump)[:, :, None],
            coact_base=torch.full_like(windows, layout.coact_offset).masked_fill_(~mask, dump),
            capacity=capacity[:, :, None],
        )


@dataclass(frozen=True)
class _Layout:
    """Where each integer counter lives in a layer's one int64 buffer.

    ``[domains * E]`` per-domain counts (their sum over domains is the per-expert count), ``[E * E]``
    co-activation, one dump bin that padding positions are sent to, then ``[windows * E]`` the current
    batch's per-window counts (for capacity drops; the tail, so that it can grow).
    """

    num_experts: int
    num_domains: int
    num_windows: int

    @property
    def coact_offset(self) -> int:
        return max(self.num_domains, 1) * self.num_experts

    @property
    def dump(self) -> int:
        return self.coact_offset + self.num_experts * self.num_experts

    @property
    def window_offset(self) -> int:
        return self.dump + 1

    @property
    def size(self) -> int:
        return self.window_offset + self.num_windows * self.num_experts


@dataclass
class Snapshot:
    """An accumulator's counters on the host: CPU tensors and Python numbers.

    Attributes:
        top_k: experts per token (0 before any real token).
        tokens: real tokens counted.
        counts: ``[E]`` int64 assignments per expert.
        domain_counts: ``[max(domains, 1), E]`` int64 assignments per domain and expert.
        domain_tokens: ``[max(domains, 1)]`` int64 tokens per domain.
        coactivation: ``[E, E]`` int64 tokens that chose both experts (the diagonal is ``counts``).
        dropped: ``[len(CAPACITY_FACTORS)]`` int64 assignments beyond capacity.
        prob_sum: ``[E]`` float64 router probability mass per expert.
        z_sum, top1_sum, margin_sum: sums over tokens of logsumexp^2, the top-1 probability and the
            top-1/top-2 probability margin.
    """

    top_k: int
    tokens: int
    counts: Any
    domain_counts: Any
    domain_tokens: Any
    coactivation: Any
    dropped: Any
    prob_sum: Any
    z_sum: float
    top1_sum: float
    margin_sum: float

    @property
    def assignments(self) -> int:
        return self.tokens * self.top_k


class LayerAccumulator:
    """Counters of one MoE layer. Memory is O(experts^2 + domains * experts), independent of tokens.

    Read the results with :meth:`snapshot` (one device-to-host copy); the attributes of the first
    implementation (``counts``, ``tokens``, ``coactivation``...) remain as properties over it.
    """

    def __init__(self, num_experts: int, num_domains: int, device: Any) -> None:
        import torch

        self.num_experts = num_experts
        self.num_domains = num_domains
        self.device = torch.device(device)
        self._top_k = 0
        self._layout = _Layout(num_experts, num_domains, 0)
        self._bins = torch.zeros(self._layout.size, dtype=torch.int64, device=self.device)
        self._dropped = torch.zeros(len(CAPACITY_FACTORS), dtype=torch.int64, device=self.device)
        # Float sums: per-expert probability mass, then z (logsumexp^2), top-1 and top-2 probabilities.
        self._sums = torch.zeros(num_experts + 3, dtype=torch.float64, device=self.device)
        self._version = 0
        self._snapshot: tuple[int, Snapshot] | None = None

    # ------------------------------------------------------------------ hot path

    def update(self, logits: Any, indices: Any, ctx: BatchContext) -> None:
        """Add one router call's tokens (padding excluded). Never waits for the device.

        Args:
            logits: ``[N, E]`` router logits (any float dtype; read, never modified).
            indices: ``[N, k]`` the distinct experts chosen for each token.
            ctx: the batch's context (``N`` positions).
        """
        import torch

        n, num_experts = logits.shape
        if n != ctx.mask.shape[0]:
            raise RuntimeError(f"router saw {n} tokens but the batch has {ctx.mask.shape[0]} positions")
        if num_experts != self.num_experts:
            raise RuntimeError(f"router has {num_experts} experts, this layer's counters {self.num_experts}")
        top_k = indices.shape[-1]
        if self._top_k and top_k != self._top_k:
            raise RuntimeError(f"top-k changed from {self._top_k} to {top_k} within one layer")
        self._top_k = top_k
        if n == 0:
            return
        self._version += 1
        device = self.device
        logits = logits.to(device, non_blocking=True)
        idx = indices.to(device=device, dtype=torch.long, non_blocking=True)
        derived = ctx.derived(num_experts, self.num_domains, top_k, device)
        self._count(idx, derived, ctx.num_windows)
        self._float_sums(logits, derived)

    def _count(self, idx: Any, derived: _Derived, num_windows: int) -> None:
        """Domain counts, co-activation and per-window counts: one ``index_add_`` of ``2k + k^2`` keys per
        token into the layer's buffer (every key of a padding position is the dump bin)."""
        import torch

        if num_windows > self._layout.num_windows:
            self._grow(num_windows)
        layout = self._layout
        n, k = idx.shape
        e = self.num_experts
        idx = torch.where(derived.invalid, 0, idx)
        keys = torch.empty(n, 2 * k + k * k, dtype=torch.long, device=idx.device)
        # Domain row + expert, window row + expert.
        torch.add(derived.bases, idx[:, None, :], out=keys[:, : 2 * k].view(n, 2, k))
        # Co-activation as sparse pairs: token t adds 1 to (i, j) for every pair of its k experts (the
        # diagonal is the per-expert count): k^2 keys per token instead of an [N, E] one-hot and an
        # E x E matmul.
        rows = torch.add(derived.coact_base, idx, alpha=e)
        torch.add(rows[:, :, None], idx[:, None, :], out=keys[:, 2 * k :].view(n, k, k))
        window = self._bins[layout.window_offset :]
        window.zero_()
        self._bins.index_add_(0, keys.view(-1), _ones(keys.numel(), idx.device))
        # Capacity: assignments beyond each window's capacity are those a capacity-limited
        # implementation would drop.
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

    def _grow(self, num_windows: int) -> None:
        """Make room for more windows per batch (the per-window region is the buffer's tail)."""
        import torch

        layout = _Layout(self.num_experts, self.num_domains, num_windows)
        bins = torch.zeros(layout.size, dtype=torch.int64, device=self.device)
        keep = self._layout.window_offset
        bins[:keep] = self._bins[:keep]
        self._bins, self._layout = bins, layout

    # ------------------------------------------------------------------ results

    def snapshot(self) -> Snapshot:
        """The counters on the host (one copy per read after new updates)."""
        if self._snapshot is not None and self._snapshot[0] == self._version:
            return self._snapshot[1]
        e, d = self.num_experts, max(self.num_domains, 1)
        k = self._top_k
        bins = self._bins[: self._layout.dump].cpu()
        domain_counts = bins[: d * e].view(d, e).clone()
        # Every real token adds exactly k assignments to its domain's row, so tokens follow from the counts.
        domain_tokens = domain_counts.sum(1) // k if k else domain_counts.sum(1)
        tokens = int(domain_tokens.sum())
        sums = self._sums.cpu()
        scalars = sums[e:].tolist()
        snap = Snapshot(
            top_k=k if tokens else 0,
            tokens=tokens,
            counts=domain_counts.sum(0),
            domain_counts=domain_counts,
            domain_tokens=domain_tokens,
            coactivation=bins[self._layout.coact_offset : self._layout.dump].view(e, e).clone(),
            dropped=self._dropped.cpu(),
            prob_sum=sums[:e].clone(),
            z_sum=scalars[0],
            top1_sum=scalars[1],
            margin_sum=scalars[1] - scalars[2],
        )
        self._snapshot = (self._version, snap)
        return snap

    @property
    def tokens(self) -> int:
        return self.snapshot().tokens

    @property
    def assignments(self) -> int:
        return self.snapshot().assignments

    @property
    def top_k(self) -> int:
        return self.snapshot().top_k

    @property
    def counts(self) -> Any:
        return self.snapshot().counts

    @property
    def domain_counts(self) -> Any:
        return self.snapshot().domain_counts

    @property
    def domain_tokens(self) -> Any:
        return self.snapshot().domain_tokens

    @property
    def coactivation(self) -> Any:
        return self.snapshot().coactivation

    @property
    def dropped(self) -> Any:
        return self.snapshot().dropped

    @property
    def prob_sum(self) -> Any:
        return self.snapshot().prob_sum

    @property
    def z_sum(self) -> float:
        return self.snapshot().z_sum

    @property
    def top1_sum(self) -> float:
        return self.snapshot().top1_sum

    @property
    def margin_sum(self) -> float:
        return self.snapshot().margin_sum


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
