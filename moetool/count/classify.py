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
# Any index component, numeric or with a stem (``expert_3``), and a template placeholder.
_ANY_INDEX = re.compile(r"(?<![^.])([A-Za-z_]*?_)?(\d+)(?![^.])")
_PLACEHOLDER = re.compile(r"(?<![^.])([A-Za-z_]*?_)?\{[^{}]+\}(?![^.])")


def _by_name(templates_by_category: dict[str, tuple[T, ...]]) -> dict[str, str]:
    """Template name (with a literal ``{E}``) -> category: matching is one dict lookup per tensor."""
    return {t.name: category for category, templates in templates_by_category.items() for t in templates}


def _normal(name: str) -> str:
    """A name or template with every index (number or placeholder) replaced by ``#``."""
    return _ANY_INDEX.sub(
        lambda m: (m.group(1) or "") + "#", _PLACEHOLDER.sub(lambda m: (m.group(1) or "") + "#", name)
    )


def _by_normal(templates_by_category: dict[str, tuple[T, ...]]) -> dict[str, tuple[str, int | None]]:
    """Normalised template name -> (category, position of the ``{E}`` index among the name's indices)."""
    out: dict[str, tuple[str, int | None]] = {}
    for category, templates in templates_by_category.items():
        for template in templates:
            indices = [
                m.group(0) for m in re.finditer(r"(?<![^.])(?:[A-Za-z_]*?_)?(?:\{[^{}]+\}|\d+)(?![^.])", template.name)
            ]
            position = next((i for i, text in enumerate(indices) if "{E}" in text), None)
            out.setdefault(_normal(template.name), (category, position))
    return out


def _lookup(
    table: dict[str, str], rest: str, normal: dict[str, tuple[str, int | None]] | None = None
) -> tuple[str, int | None] | None:
    """Category and expert index of a layer-relative name, if a template names it."""
    if rest in table:
        return table[rest], None
    match = _INDEX_COMPONENT.search(rest)
    if match:
        key = rest[: match.start(1)] + "{E}" + rest[match.end(1) :]
        if key in table:
            return table[key], int(match.group(1))
    if normal:
        hit = normal.get(_normal(rest))
        if hit is not None:
            category, position = hit
            if position is None:
                return category, None
            numbers = [int(m.group(2)) for m in _ANY_INDEX.finditer(rest)]
            return category, numbers[position] if position < len(numbers) else None
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
        self._global_normal = _by_normal(dict(spec.globals_))
        layer_pattern = re.escape(spec.layer_prefix).replace(re.escape("{L}"), r"(?P<layer>\d+)")
        self._layer_re = re.compile(layer_pattern + r"(?P<rest>.+)\Z")
        self._layer_templates = _by_name(spec.layer_templates())
        self._layer_normal = _by_normal(spec.layer_templates())
        # Encoder-decoder families: one pattern and template table per stack.
        self._stacks = []
        for index, stack in enumerate(spec.stacks):
            pattern = re.escape(stack.prefix).replace(re.escape("{L}"), r"(?P<layer>\d+)")
            templates = {c: tuple(t for t in ts if t.stack == index) for c, ts in spec.layer_templates().items()}
            self._stacks.append((re.compile(pattern + r"(?P<rest>.+)\Z"), _by_name(templates), _by_normal(templates)))
        self._has_mtp = bool(spec.mtp or spec.mtp_fields)

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
        if self.spec.mtp_prefixes and name.startswith(self.spec.mtp_prefixes):
            return Placement("mtp")
        for index, (pattern, table, normal) in enumerate(self._stacks):
            match = pattern.match(name)
            if match is not None:
                layer = self.dims.stack_starts[index] + int(match["layer"])
                hit = _lookup(table, match["rest"], normal)
                if hit is not None:
                    return Placement(hit[0], layer, hit[1])
                return Placement(
                    _heuristic_layer_category(match["rest"], self.dims.is_moe_layer(layer)), layer, matched=False
                )
        match = self._layer_re.match(name) if not self._stacks else None
        if match is None:
            hit = self._global_normal.get(_normal(name)) if self._global_normal else None
            if hit is not None:
                return Placement(hit[0])
            return Placement(_heuristic_global_category(name), matched=False)
        layer = int(match["layer"])
        rest = match["rest"]
        if layer >= self.dims.num_layers:
            # Layers past num_hidden_layers are DeepSeek-style MTP modules when the family has them.
            return Placement("mtp" if self._has_mtp else "other", layer, matched=self._has_mtp)
        hit = _lookup(self._layer_templates, rest, self._layer_normal)
        if hit is not None:
            return Placement(hit[0], layer, hit[1])
        category = _heuristic_layer_category(rest, self.dims.is_moe_layer(layer))
        return Placement(category, layer, matched=False)
