"""What one routing-accumulator update may run, in torch profiler terms (the test and the bench share it).

The accumulator (:mod:`moetool.routing.accumulate`) must never make a GPU wait for the host. These are
the aten operations that read values back or size their output from the data (:data:`SYNC_OPS`), and the
ones that launch no kernel (:data:`FREE_OPS`), so that a profile of one update on the CPU says how many
kernels it launches and whether it could sync.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

#: aten operations that read tensor values back to the host or have data-dependent shapes.
SYNC_OPS = frozenset(
    {
        "aten::nonzero",
        "aten::item",
        "aten::_local_scalar_dense",
        "aten::masked_select",
        "aten::bincount",
        "aten::repeat_interleave",
        "aten::unique",
        "aten::_unique2",
        "aten::index",  # boolean-mask (and advanced) indexing
        "aten::is_nonzero",
    }
)

#: Operations that launch no kernel (views, slices, allocations, no-op conversions).
FREE_OPS = frozenset(
    {
        "aten::slice",
        "aten::view",
        "aten::unsqueeze",
        "aten::as_strided",
        "aten::empty",
        "aten::empty_strided",
        "aten::select",
        "aten::reshape",
        "aten::expand",
        "aten::to",
        "aten::_to_copy",
        "aten::resolve_conj",
        "aten::lift_fresh",
        "aten::detach_",
    }
)


def kernel_ops(events: Iterable[Any]) -> list[str]:
    """Top-level aten operations of profiler ``events`` that run a kernel (at least one on a GPU)."""
    return [e.name for e in events if e.cpu_parent is None and e.name.startswith("aten::") and e.name not in FREE_OPS]


def sync_ops(events: Iterable[Any]) -> list[str]:
    """Operations of profiler ``events``, at any depth, that could make a GPU wait for the host."""
    return [e.name for e in events if e.name in SYNC_OPS]
