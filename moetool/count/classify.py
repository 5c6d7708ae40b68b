"""Place a tensor name in its parameter category, layer and expert, from the family's templates."""

from __future__ import annotations

import re
from dataclasses import dataclass

from moetool.arch.dims import Dims
from moetool.arch.spec import FamilySpec, T


@dataclass(frozen=True)
class Placement:
    """Where a tensor belongs.

    Attributes:
        category: one of :data:`moetool.arch.spec.CATEGORIES`.
        layer: decoder layer index (MTP modules continue the numbering), or None for global tensors.
        expert: routed expert index for per-expert tensors, else None.
        matched: whether a family template matched (False means a name heuristic decided).
    """

    category: str
    layer: int | None = None
    expert: int | None = None
    matched: bool = True


# A purely numeric name component (the expert index in per-expert layouts).
_INDEX_COMPONENT = re.compile(r"(?:^|\.)(\d+)\.")


def _by_name(templates_by_category: dict[str, tuple[T, ...]]) -> dict[str, str]:
    """Template name (with a literal ``{E}``) -> category: matching is one dict lookup per tensor."""
    return {t.name: category for category, templates in templates_by_category.items() for t in templates}


def _lookup(table: dict[str, str], rest: str) -> tuple[str, int | None] | None:
    """Category and expert index of a layer-relative name, if a template names it."""
    if rest in table:
        return table[rest], None
    match = _INDEX_COMPONENT.search(rest)
    if match:
        key = rest[: match.start(1)] + "{E}" + rest[match.end(1) :]
        if key in table:
            return table[key], int(match.group(1))
    return None


def _heuristic_layer_category(rest: str, moe_layer: bool) -> str:
    """Fallback for tensors no template names (other storage layouts, unusual exports)."""
    parts = rest.split(".")
    if any("shared" in p for p in parts):
        return "shared_experts"
    if any(p == "experts" or p.startswith("experts") for p in parts):
        return "routed_experts"
    if any(p in ("gate", "router", "wg") for p in parts[:-1]) and moe_layer:
        return "router"
    if any("attn" in p or "attention" in p for p in parts):
        return "attention"
    if any("norm" in p for p in parts):
        return "norms"
    if any(p in ("mlp", "feed_forward", "ffn") for p in parts):
        return "dense_mlp" if not moe_layer else "other"
    return "other"


def _heuristic_global_category(name: str) -> str:
    if "embed" in name or name.endswith("wte.weight"):
        return "embedding"
    if "lm_head" in name:
        return "lm_head"
    if "norm" in name:
        return "norms"
    return "other"


class TensorClassifier:
    """Classifies (logical) tensor names of one checkpoint.

    Args:
        spec: the model family.
        dims: the resolved config, for the number of decoder layers and the MoE schedule.
    """

    def __init__(self, spec: FamilySpec, dims: Dims) -> None:
        self.spec = spec
        self.dims = dims
        self._globals = {t.name: category for category, templates in spec.globals_.items() for t in templates}
        layer_pattern = re.escape(spec.layer_prefix).replace(re.escape("{L}"), r"(?P<layer>\d+)")
        self._layer_re = re.compile(layer_pattern + r"(?P<rest>.+)\Z")
        self._layer_templates = _by_name(spec.layer_templates())

    def strip_prefix(self, name: str) -> str:
        """Remove multimodal wrapper prefixes (``language_model.``) from a tensor name."""
        for prefix in self.spec.name_prefixes:
            if name.startswith(prefix):
                return name[len(prefix) :]
        return name

    def classify(self, name: str) -> Placement:
        """The placement of a logical tensor name (quantization suffixes already removed)."""
        name = self.strip_prefix(name)
        if name in self._globals:
            return Placement(self._globals[name])
        match = self._layer_re.match(name)
        if match is None:
            return Placement(_heuristic_global_category(name), matched=False)
        layer = int(match["layer"])
        rest = match["rest"]
        if layer >= self.dims.num_layers:
            # Layers past num_hidden_layers are DeepSeek-style MTP modules when the family has them.
            return Placement("mtp" if self.spec.mtp else "other", layer, matched=bool(self.spec.mtp))
        hit = _lookup(self._layer_templates, rest)
        if hit is not None:
            return Placement(hit[0], layer, hit[1])
        category = _heuristic_layer_category(rest, self.dims.is_moe_layer(layer))
        return Placement(category, layer, matched=False)
