"""The tensors a config implies: names and shapes, computed from the family's templates."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from moetool.arch.dims import Dims, eval_dim, template_applies
from moetool.arch.spec import FamilySpec, T


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor the config implies."""

    name: str
    shape: tuple[int, ...]


def _expand(prefix: str, templates: tuple[T, ...], values: dict, num_experts: int) -> Iterator[PlannedTensor]:
    for template in templates:
        if not template_applies(template, values):
            continue
        shape = tuple(eval_dim(term, values) for term in template.shape)
        if "{E}" in template.name:
            for expert in range(num_experts):
                yield PlannedTensor(prefix + template.name.replace("{E}", str(expert)), shape)
        else:
            yield PlannedTensor(prefix + template.name, shape)


def expand_templates(prefix: str, templates: tuple[T, ...], values: dict, num_experts: int = 0) -> list[PlannedTensor]:
    """Instantiate templates (those whose ``when`` holds) with a name prefix and resolved dims.

    Args:
        prefix: prepended to every name (a layer prefix such as ``"model.layers.3."``, or ``""``).
        templates: the templates, e.g. a family's ``attention``.
        values: resolved dims (:meth:`Dims.for_layer`).
        num_experts: how many tensors an ``{E}`` template gives.
    """
    return list(_expand(prefix, templates, values, num_experts))


def layer_tensors(spec: FamilySpec, dims: Dims, layer: int, *, moe: bool) -> Iterator[PlannedTensor]:
    """The tensors of one decoder layer (MoE or dense MLP)."""
    values = dims.for_layer(layer)
    prefix = spec.layer_prefix.format(L=layer)
    num_experts = values.get("E", 0)
    yield from _expand(prefix, spec.attention, values, num_experts)
    yield from _expand(prefix, spec.norms, values, num_experts)
    if moe:
        yield from _expand(prefix, spec.router, values, num_experts)
        yield from _expand(prefix, spec.routed_experts, values, num_experts)
        yield from _expand(prefix, spec.shared_experts, values, num_experts)
    else:
        yield from _expand(prefix, spec.dense_mlp, values, num_experts)


def planned_tensors(spec: FamilySpec, dims: Dims) -> Iterator[PlannedTensor]:
    """Every tensor a checkpoint of this family and config stores, in a stable order.

    MTP modules (DeepSeek-V3 ``num_nextn_predict_layers``) follow the decoder layers, each a full MoE
    decoder layer plus its own projections, norms, embedding and head.
    """
    values = dims.values
    for category in ("embedding",):
        yield from _expand("", spec.globals_.get(category, ()), values, 0)
    for layer in range(dims.num_layers):
        yield from layer_tensors(spec, dims, layer, moe=dims.is_moe_layer(layer))
    for index in range(dims.num_mtp):
        layer = dims.num_layers + index
        yield from layer_tensors(spec, dims, layer, moe=spec.is_moe)
        yield from _expand(spec.layer_prefix.format(L=layer), spec.mtp, values, 0)
    for category in ("norms", "lm_head"):
        yield from _expand("", spec.globals_.get(category, ()), values, 0)
