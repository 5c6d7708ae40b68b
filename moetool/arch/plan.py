"""The tensors a config implies: names and shapes, computed from the family's templates."""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterator
from dataclasses import dataclass

from moetool.arch.dims import Dims, eval_dim, template_applies
from moetool.arch.spec import CATEGORIES, FamilySpec, T

# A placeholder in a template name: {E} (routed experts) or a derived family's index symbol ({L},
# {vision_config.depth}); each runs over range(value of the symbol).
PLACEHOLDER = re.compile(r"\{([^{}]+)\}")


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor the config implies."""

    name: str
    shape: tuple[int, ...]


def _expand(
    prefix: str, templates: tuple[T, ...], values: dict, num_experts: int, stack: int | None = None
) -> Iterator[PlannedTensor]:
    for template in templates:
        if stack is not None and template.stack != stack:
            continue
        if not template_applies(template, values):
            continue
        shape = tuple(eval_dim(term, values) for term in template.shape)
        symbols = PLACEHOLDER.findall(template.name)
        if not symbols:
            yield PlannedTensor(prefix + template.name, shape)
        elif symbols == ["E"]:
            for expert in range(num_experts):
                yield PlannedTensor(prefix + template.name.replace("{E}", str(expert)), shape)
        else:
            counts = [num_experts if s == "E" else eval_dim(s, values) for s in symbols]
            pieces = PLACEHOLDER.split(template.name)  # text, symbol, text, symbol, ..., text
            # A block-indexed condition (``c:at:SYMBOL:...``, see dims.block_condition) keeps some blocks.
            blocks = values.get(template.when) if template.when and template.when.startswith("c:at:") else None
            position = symbols.index(template.when[5:].split(":", 1)[0]) if blocks is not None else -1
            for indices in itertools.product(*(range(n) for n in counts)):
                if blocks is not None and not blocks[indices[position]]:
                    continue
                name = "".join(p if i % 2 == 0 else str(indices[i // 2]) for i, p in enumerate(pieces))
                yield PlannedTensor(prefix + name, shape)


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
    """The tensors of one decoder layer (MoE or dense MLP).

    Derived families (``spec.derived``) give every template its own layer condition, so their MoE
    and dense parts are selected by those conditions alone.
    """
    values = dims.for_layer(layer)
    stack = None
    if spec.stacks:
        stack, local = dims.stack_of(layer)
        prefix = spec.stacks[stack].prefix.format(L=local)
    else:
        prefix = spec.layer_prefix.format(L=layer)
    num_experts = values.get("E", 0)
    for templates in (spec.attention, spec.norms, spec.layer_other):
        yield from _expand(prefix, templates, values, num_experts, stack)
    if moe or spec.derived:
        for templates in (spec.router, spec.routed_experts, spec.shared_experts):
            yield from _expand(prefix, templates, values, num_experts, stack)
    if not moe or spec.derived:
        yield from _expand(prefix, spec.dense_mlp, values, num_experts, stack)


def planned_tensors(spec: FamilySpec, dims: Dims) -> Iterator[PlannedTensor]:
    """Every tensor a checkpoint of this family and config stores, in a stable order.

    MTP modules (DeepSeek-V3 ``num_nextn_predict_layers``) follow the decoder layers, each a full MoE
    decoder layer plus its own projections, norms, embedding and head.
    """
    values = dims.values
    num_experts = values.get("E", 0)
    yield from _expand("", spec.globals_.get("embedding", ()), values, num_experts)
    for layer in range(dims.num_layers):
        yield from layer_tensors(spec, dims, layer, moe=dims.is_moe_layer(layer))
    for index in range(dims.num_mtp if spec.mtp else 0):
        layer = dims.num_layers + index
        yield from layer_tensors(spec, dims, layer, moe=spec.is_moe)
        yield from _expand(spec.layer_prefix.format(L=layer), spec.mtp, values, 0)
    for category in ("norms", "lm_head"):
        yield from _expand("", spec.globals_.get(category, ()), values, num_experts)
    for category in CATEGORIES:
        if category not in ("embedding", "norms", "lm_head"):
            yield from _expand("", spec.globals_.get(category, ()), values, num_experts)
