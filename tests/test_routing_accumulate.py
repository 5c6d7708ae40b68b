"""The routing accumulator: identical counts to a straightforward reference, and no host-device sync.

How "no sync" is checked without a GPU: the update is run on the ``meta`` device, where every operation
whose output shape or control flow depends on tensor values fails (boolean-mask indexing and
``nonzero``, ``.item()`` / ``int()`` / ``bool()`` of a tensor, ``bincount``, ``repeat_interleave``
with tensor repeats): those are exactly the operations that make a CUDA stream wait for the host. The
reference implementation (the first one, which selected real tokens with ``logits[mask]``) fails that
check, so the check is known to bite. On the CPU, torch's profiler lists the aten operations one update
runs: none of the sync-prone ones, and a bounded count.
"""

from __future__ import annotations

import collections
import math

import pytest
import torch

from moetool.routing.accumulate import CAPACITY_FACTORS, BatchContext, LayerAccumulator
from moetool.routing.ops import SYNC_OPS, kernel_ops


class ReferenceAccumulator:
    """The first implementation (boolean-mask selection, bincounts, a one-hot matmul), kept as the oracle."""

    def __init__(self, num_experts: int, num_domains: int) -> None:
        f64, i64 = torch.float64, torch.int64
        self.num_experts = num_experts
        self.tokens = 0
        self.assignments = 0
        self.top_k = 0
        self.counts = torch.zeros(num_experts, dtype=i64)
        self.prob_sum = torch.zeros(num_experts, dtype=f64)
        self.coactivation = torch.zeros(num_experts, num_experts, dtype=f64)
        self.domain_counts = torch.zeros(max(num_domains, 1), num_experts, dtype=i64)
        self.domain_tokens = torch.zeros(max(num_domains, 1), dtype=i64)
        self.dropped = torch.zeros(len(CAPACITY_FACTORS), dtype=i64)
        self.z_sum = torch.zeros((), dtype=f64)
        self.top1_sum = torch.zeros((), dtype=f64)
        self.margin_sum = torch.zeros((), dtype=f64)
        self.kept = None  # assignments a capacity-limited model kept: not tracked by the oracle

    def update(self, logits, indices, ctx: BatchContext) -> None:
        num_experts = self.num_experts
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
        probs = torch.softmax(logits, dim=-1)
        self.prob_sum += probs.sum(0, dtype=torch.float64)
        self.z_sum += (torch.logsumexp(logits, dim=-1).double() ** 2).sum()
        if num_experts >= 2:
            top2 = probs.topk(2, dim=-1).values.double()
            self.top1_sum += top2[:, 0].sum()
            self.margin_sum += (top2[:, 0] - top2[:, 1]).sum()
        else:
            self.top1_sum += tokens
        chosen = torch.zeros(tokens, num_experts, dtype=torch.float32)
        chosen.scatter_(1, indices, 1.0)
        self.coactivation += (chosen.T @ chosen).double()
        domain_of_choice = domains.repeat_interleave(top_k)
        self.domain_counts += torch.bincount(
            domain_of_choice * num_experts + flat, minlength=self.domain_counts.numel()
        ).view_as(self.domain_counts)
        self.domain_tokens += torch.bincount(domains, minlength=self.domain_tokens.numel())
        window_of_choice = windows.repeat_interleave(top_k)
        per_window = torch.bincount(window_of_choice * num_experts + flat, minlength=ctx.num_windows * num_experts)
        per_window = per_window.view(ctx.num_windows, num_experts)
        window_tokens = torch.bincount(windows, minlength=ctx.num_windows)
        for i, factor in enumerate(CAPACITY_FACTORS):
            capacity = torch.ceil(window_tokens.double() * factor * top_k / num_experts).long()
            self.dropped[i] += (per_window - capacity[:, None]).clamp(min=0).sum()


def random_batch(generator, num_experts, top_k, rows, length, num_domains, *, skew=0.0, device="cpu"):
    """Router logits, their top-k choices (distinct per token, as every router gives) and a context with
    right padding in random rows."""
    logits = torch.randn(rows * length, num_experts, generator=generator)
    logits[:, 0] += skew  # an expert that every window overloads, so capacity drops happen
    indices = logits.topk(top_k, dim=-1).indices
    lengths = torch.randint(0, length + 1, (rows,), generator=generator)
    lengths[0] = length
    mask = (torch.arange(length)[None, :] < lengths[:, None]).reshape(-1)
    domains = torch.randint(0, max(num_domains, 1), (rows,), generator=generator)
    ctx = BatchContext(
        mask=mask.to(device),
        window_ids=torch.arange(rows).repeat_interleave(length).to(device),
        domain_ids=domains.repeat_interleave(length).to(device),
        num_windows=rows,
        tokens=int(mask.sum()),
    )
    return logits.to(device), indices.to(device), ctx


CASES = [
    # experts, top_k, domains, skew
    (8, 2, 3, 0.0),
    (8, 2, 0, 2.0),
    (4, 1, 2, 3.0),
    (1, 1, 0, 0.0),
    (2, 2, 1, 0.0),
    (128, 8, 3, 1.0),
    (256, 8, 0, 0.0),
]


@pytest.mark.parametrize(("num_experts", "top_k", "num_domains", "skew"), CASES)
def test_same_counts_and_metrics_as_reference(num_experts, top_k, num_domains, skew):
    generator = torch.Generator().manual_seed(num_experts * 31 + top_k)
    new = LayerAccumulator(num_experts, num_domains, "cpu")
    ref = ReferenceAccumulator(num_experts, num_domains)
    # Batches of different window counts (the last batch of a dataset is smaller), one all padding.
    for rows, length in ((3, 17), (5, 9), (1, 4), (4, 16)):
        logits, indices, ctx = random_batch(generator, num_experts, top_k, rows, length, num_domains, skew=skew)
        if rows == 1:
            ctx.mask[:] = False
            ctx.tokens = 0
        new.update(logits, indices, ctx)
        ref.update(logits, indices, ctx)
    assert new.tokens == ref.tokens and new.assignments == ref.assignments and new.top_k == ref.top_k
    assert torch.equal(new.counts, ref.counts)
    assert torch.equal(new.domain_counts, ref.domain_counts)
    assert torch.equal(new.domain_tokens, ref.domain_tokens)
    assert torch.equal(new.coactivation, ref.coactivation.long())
    assert torch.equal(new.dropped, ref.dropped)
    assert torch.allclose(new.prob_sum, ref.prob_sum, rtol=1e-5, atol=1e-6)
    for name in ("z_sum", "top1_sum", "margin_sum"):
        assert getattr(new, name) == pytest.approx(float(getattr(ref, name)), rel=1e-5, abs=1e-6), name


def test_stats_from_new_and_reference_agree():
    """The frozen LayerStats (what the report, the JSON and --fail-if read) are the same."""
    from moetool.routing.stats import layer_stats_from

    generator = torch.Generator().manual_seed(7)
    new, ref = LayerAccumulator(16, 2, "cpu"), ReferenceAccumulator(16, 2)
    for _ in range(3):
        logits, indices, ctx = random_batch(generator, 16, 4, 4, 32, 2, skew=1.5)
        new.update(logits, indices, ctx)
        ref.update(logits, indices, ctx)
    a = layer_stats_from(0, new, ["code", "prose"]).to_json()
    b = layer_stats_from(0, ref, ["code", "prose"]).to_json()
    for key in ("tokens", "top_k", "counts", "fractions", "cv", "entropy", "gini", "dead_experts", "coactivation"):
        assert a[key] == b[key], key
    assert a["dropped"] == b["dropped"]
    for key in ("aux_loss", "z_loss", "top1_prob", "top1_top2_margin"):
        assert a[key] == pytest.approx(b[key], rel=1e-5), key
    assert a["prob_mean"] == pytest.approx(b["prob_mean"], rel=1e-5)


def test_padding_logits_are_ignored_even_when_nan():
    generator = torch.Generator().manual_seed(3)
    logits, indices, ctx = random_batch(generator, 8, 2, 4, 12, 2)
    clean = LayerAccumulator(8, 2, "cpu")
    clean.update(logits, indices, ctx)
    dirty = logits.clone()
    dirty[~ctx.mask] = float("nan")
    garbage = LayerAccumulator(8, 2, "cpu")
    garbage.update(dirty, indices, ctx)
    assert torch.equal(clean.coactivation, garbage.coactivation) and torch.equal(clean.dropped, garbage.dropped)
    assert torch.equal(clean.prob_sum, garbage.prob_sum)
    assert math.isfinite(garbage.z_sum) and clean.z_sum == garbage.z_sum


def test_logits_are_not_modified():
    generator = torch.Generator().manual_seed(4)
    logits, indices, ctx = random_batch(generator, 8, 2, 2, 8, 0)
    before = logits.clone()
    LayerAccumulator(8, 0, "cpu").update(logits, indices, ctx)
    assert torch.equal(logits, before)


def _meta_batch(num_experts, top_k, rows, length, num_domains):
    meta = torch.device("meta")
    n = rows * length
    ctx = BatchContext(
        mask=torch.empty(n, dtype=torch.bool, device=meta),
        window_ids=torch.empty(n, dtype=torch.long, device=meta),
        domain_ids=torch.empty(n, dtype=torch.long, device=meta),
        num_windows=rows,
        tokens=n - length // 2,  # counted on the host by the caller
    )
    logits = torch.empty(n, num_experts, dtype=torch.bfloat16, device=meta)
    indices = torch.empty(n, top_k, dtype=torch.long, device=meta)
    return logits, indices, ctx


@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (128, 8), (1, 1)])
def test_update_never_needs_tensor_values(num_experts, top_k):
    """On the meta device there are no values: anything that would sync a GPU raises instead."""
    acc = LayerAccumulator(num_experts, 3, "meta")
    for rows in (8, 8, 12, 3):  # a batch with more windows than the buffer was sized for
        acc.update(*_meta_batch(num_experts, top_k, rows, 64, 3))


def test_meta_check_catches_the_reference():
    """The check above would catch the first implementation's boolean-mask selection."""
    ref = ReferenceAccumulator.__new__(ReferenceAccumulator)
    ref.num_experts = 8
    with pytest.raises((NotImplementedError, RuntimeError)):
        ref.update(*_meta_batch(8, 2, 2, 16, 2))


def profiled_ops(acc, logits, indices, ctx):
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        acc.update(logits, indices, ctx)
    return prof.events()


def test_profiler_sees_no_sync_ops_and_few_operations():
    """One update at a fine-grained shape (128 experts, top-8) on the CPU: no sync-prone operation at any
    depth, and 32 kernel-running operations at most (the reference: over 70, four of them syncs)."""
    generator = torch.Generator().manual_seed(5)
    logits, indices, ctx = random_batch(generator, 128, 8, 8, 256, 3)
    acc = LayerAccumulator(128, 3, "cpu")
    acc.update(logits, indices, ctx)  # the first layer of a batch derives the per-batch tensors
    events = profiled_ops(acc, logits, indices, ctx)
    names = collections.Counter(e.name for e in events)
    assert not SYNC_OPS & set(names), names
    ops = kernel_ops(events)
    assert len(ops) <= 32, collections.Counter(ops)

    ref = ReferenceAccumulator(128, 3)
    ref_events = profiled_ops(ref, logits, indices, ctx)
    assert "aten::nonzero" in {e.name for e in ref_events}  # the check sees the reference's syncs
    assert len(kernel_ops(ref_events)) > 2 * len(ops)


def test_without_a_host_count_the_mask_is_read_once_per_batch():
    """A context without ``tokens`` counts them from the mask at the batch's first layer only."""
    generator = torch.Generator().manual_seed(6)
    logits, indices, ctx = random_batch(generator, 8, 2, 3, 16, 0)
    expected, ctx.tokens = ctx.tokens, None
    layers = [LayerAccumulator(8, 0, "cpu") for _ in range(3)]
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for acc in layers:
            acc.update(logits, indices, ctx)
    reads = [e.name for e in prof.events() if e.name in ("aten::item", "aten::_local_scalar_dense")]
    assert len(reads) <= 2  # one .item() (dispatching to _local_scalar_dense), once
    assert ctx.tokens == expected and all(acc.tokens == expected for acc in layers)


def test_counters_sum_across_processes():
    """What a multi-process run does (routing/profile.py): each process counts a share of the batches, then
    every tensor of ``vars(acc)`` and the host integers are summed; the result equals one process counting
    all batches. The tensors have fixed sizes, whatever the window counts each process saw."""
    generator = torch.Generator().manual_seed(8)
    batches = [random_batch(generator, 16, 4, rows, 12, 2, skew=1.0) for rows in (5, 2, 3, 1)]
    whole, parts = LayerAccumulator(16, 2, "cpu"), [LayerAccumulator(16, 2, "cpu") for _ in range(2)]
    for i, batch in enumerate(batches):
        whole.update(*batch)
        parts[i % 2].update(*batch)
    summed = parts[0]
    tensors = [(k, v) for k, v in vars(summed).items() if isinstance(v, torch.Tensor)]
    assert tensors and all(v.shape == vars(parts[1])[k].shape for k, v in tensors)
    for key, value in tensors:
        value += vars(parts[1])[key]
    summed.tokens += parts[1].tokens
    summed.assignments += parts[1].assignments
    summed.top_k = max(summed.top_k, parts[1].top_k)
    for name in ("counts", "domain_counts", "domain_tokens", "coactivation", "dropped"):
        assert torch.equal(getattr(summed, name), getattr(whole, name)), name
    assert (summed.tokens, summed.assignments, summed.top_k) == (whole.tokens, whole.assignments, whole.top_k)
    assert torch.allclose(summed.prob_sum, whole.prob_sum)
    assert summed.z_sum == pytest.approx(whole.z_sum)
