"""Streaming conversion: the source tensors of one layer in, that layer's output tensors out.

:func:`iter_output_tensors` walks the plan's groups (global tensors, then each layer), reads only the
source tensors a group needs, and yields the group's output tensors in plan order. A dense MLP
tensor becomes E*G expert tensors without E copies in memory: without symmetry breaking the G
shards of one copy are made once and handed out for every copy (the writer streams the same memory
E times); with it, one perturbed copy exists at a time. Memory therefore holds about one layer of
source tensors plus one copy, whatever the model size.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING

from moetool.io.checkpoint import Checkpoint
from moetool.io.dtypes import torch_dtype
from moetool.io.shards import PlannedEntry
from moetool.upcycle.plan import Recipe, UpcyclePlan
from moetool.upcycle.router_init import router_rows
from moetool.upcycle.symmetry import perturb_copy

if TYPE_CHECKING:
    import torch


def _finish(tensor: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """Scale (in float32, rounding once) and cast; a no-op view when neither is needed."""
    if scale != 1.0:
        return (tensor.float() * scale).to(dtype).contiguous()
    return tensor.to(dtype).contiguous()


class _LayerBuilder:
    """Makes the output tensors of one group from its source tensors, caching shared pieces."""

    def __init__(
        self, plan: UpcyclePlan, layer: int, sources: dict[str, torch.Tensor], routers: Mapping[int, torch.Tensor]
    ) -> None:
        self.plan = plan
        self.layer = layer
        self.sources = sources
        self.routers = routers
        self._shards: dict[tuple[int, int, int], torch.Tensor] = {}
        self._copy_key: tuple[int, int] | None = None
        self._copy: torch.Tensor | None = None

    def build(self, entry: PlannedEntry, recipe: Recipe) -> torch.Tensor:
        dtype = torch_dtype(entry.dtype)
        kind = recipe.kind
        if kind in ("copy", "dense"):
            return self.sources[recipe.source].to(dtype)
        if kind == "router":
            return router_rows(self.plan, self.layer, self.routers.get(self.layer)).to(dtype)
        if kind == "expert":
            return self._expert(recipe, dtype)
        if kind == "shared":
            return self._shared(recipe, dtype)
        if kind == "shared_gate":
            import torch

            # sigmoid(0) = 1/2 for every token: the shared expert's half of the output (see plan.py).
            return torch.zeros(entry.shape, dtype=dtype)
        raise ValueError(f"unknown recipe kind {kind!r}")

    def _copy_of(self, recipe: Recipe) -> torch.Tensor:
        """The routed copy's full tensor (perturbed when symmetry breaking is on)."""
        dense = self.sources[recipe.source]
        opts = self.plan.options
        if not opts.breaks_symmetry:
            return dense
        key = (recipe.role, recipe.copy)
        if self._copy_key != key:
            self._copy = None  # drop the previous copy before making the next one
            self._copy = perturb_copy(
                dense,
                role=recipe.role,
                layer=self.layer,
                copy=recipe.copy,
                noise=opts.noise,
                reinit_ratio=opts.reinit_ratio,
                seed=opts.seed,
            )
            self._copy_key = key
            self._shards.clear()
        assert self._copy is not None
        return self._copy

    def _expert(self, recipe: Recipe, dtype: torch.dtype) -> torch.Tensor:
        full = self._copy_of(recipe)
        key = (recipe.role, recipe.copy if self.plan.options.breaks_symmetry else 0, recipe.shard)
        cached = self._shards.get(key)
        if cached is not None:
            return cached
        width = self.plan.expert_width
        start = recipe.shard * width
        if recipe.role == 2:  # down: [H, D], the shard is a column block, scaled
            piece = _finish(full[:, start : start + width], self.plan.routed_down_scale, dtype)
        else:  # gate / up: [D, H], a row block (a view: no copy unless the dtype changes)
            piece = _finish(full[start : start + width], 1.0, dtype)
        if not self.plan.options.breaks_symmetry:
            # Identical copies: keep the G shards of each role for the next copy. Once the next role
            # starts, the previous role's shards are no longer needed.
            for other in [k for k in self._shards if k[0] != recipe.role]:
                del self._shards[other]
        self._shards[key] = piece
        return piece

    def _shared(self, recipe: Recipe, dtype: torch.dtype) -> torch.Tensor:
        import torch

        dense = self.sources[recipe.source]
        copies = self.plan.options.shared_experts
        if recipe.role == 2:
            piece = _finish(dense, self.plan.shared_down_scale, dtype)
            return torch.cat([piece] * copies, dim=1) if copies else piece[:, :0].contiguous()
        piece = dense.to(dtype)
        return torch.cat([piece] * copies, dim=0) if copies else piece[:0].contiguous()


def source_names(run: list[tuple[PlannedEntry, Recipe]]) -> list[str]:
    """The source tensors a group of outputs is made from, first use first."""
    return list(dict.fromkeys(r.source for _, r in run if r.source is not None))


def iter_output_tensors(
    plan: UpcyclePlan, checkpoint: Checkpoint, *, routers: Mapping[int, torch.Tensor] | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` for every planned output tensor, in plan order.

    Args:
        plan: the plan.
        checkpoint: the dense source (tensors are read one group at a time).
        routers: per-layer router rows ``[E, H]`` computed beforehand (``--router-init kmeans``).
    """
    for layer, run in plan.groups():
        sources = dict(checkpoint.iter_tensors(source_names(run)))
        builder = _LayerBuilder(plan, layer, sources, routers or {})
        for entry, recipe in run:
            yield entry.name, builder.build(entry, recipe)
        del builder, sources
