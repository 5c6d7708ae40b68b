"""Find the layer condition (see :mod:`moetool.arch.layers`) that selects given layers in every probe."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from moetool.arch.layers import RULES, select_layers

_STEP_WORDS = ("step", "interval", "freq", "period", "every", "group")


def _per_layer_fields(config: Mapping[str, Any], num_layers: int) -> Iterator[tuple[str, list[str]]]:
    for key, value in config.items():
        if not isinstance(value, (list, str)) or len(value) != num_layers or num_layers < 2:
            continue
        if isinstance(value, str):
            if "pattern" in key:  # a hybrid pattern string ("MEM*EM"), one character per layer
                yield key, list(value)
        elif all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
            yield key, [str(v) for v in value]


def _index_fields(config: Mapping[str, Any]) -> Iterator[str]:
    for key, value in config.items():
        if isinstance(value, list) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            yield key


def candidates(config: Mapping[str, Any], num_layers: int, layers: set[int], prefer: str | None) -> Iterator[str]:
    """Conditions to try, simplest first, built from the base probe's config and target layers."""
    atoms: list[str] = ["all"]
    if prefer:
        atoms += [prefer, f"!{prefer}"] if "&" not in prefer else [prefer]
    for key, seq in _per_layer_fields(config, num_layers):
        values = {seq[ly] for ly in layers if ly < len(seq)}
        if values and not any(seq[ly] in values for ly in range(num_layers) if ly not in layers):
            atoms.append(f"in:{key}:{'|'.join(sorted(values))}")
    atoms += [f"rule:{name}" for name in RULES]
    atoms += ["first", "!first"]
    for key, value in config.items():
        if isinstance(value, int) and not isinstance(value, bool) and any(w in key for w in _STEP_WORDS):
            atoms += [f"every:{key}", f"every1:{key}"]
    for key in _index_fields(config):
        atoms += [f"idx:{key}", f"!idx:{key}"]
    atoms += [f"!rule:{name}" for name in RULES]
    yield from atoms
    if prefer and "&" not in prefer:
        for atom in atoms[1:]:
            if atom not in (prefer, f"!{prefer}"):
                yield f"{prefer}&{atom}"
                yield f"!{prefer}&{atom}"


def matches(
    condition: str,
    targets: Mapping[frozenset[str], set[int]],
    configs: Mapping[frozenset[str], Mapping[str, Any]],
    layer_count: Mapping[frozenset[str], int],
) -> bool:
    for changed, layers in targets.items():
        try:
            chosen = select_layers(condition, configs[changed], layer_count[changed])
        except Exception:
            return False
        if {ly for ly, on in enumerate(chosen) if on} != layers:
            return False
    return True


def find_condition(
    targets: Mapping[frozenset[str], set[int]],
    configs: Mapping[frozenset[str], Mapping[str, Any]],
    layer_count: Mapping[frozenset[str], int],
    *,
    prefer: str | None = None,
) -> str | None:
    """The simplest condition that selects exactly ``targets[probe]`` in every probe, or None.

    Args:
        targets: probe key -> the layers that must be selected (the base probe has key ``frozenset()``).
        configs: probe key -> that probe's (text) config dict.
        layer_count: probe key -> that probe's number of layers.
        prefer: a condition tried right after ``all`` (the family's MoE schedule).
    """
    base = frozenset()
    for condition in candidates(configs[base], layer_count[base], targets[base], prefer):
        if matches(condition, targets, configs, layer_count):
            return condition
    return None
