"""Turn the concrete tensor names of a probe into templates with index placeholders.

A numeric name component (``layers.3``, ``experts.17``, ``expert_17``) is an *index*. Indices that
run over ``range(n)`` where ``n`` is a config field (the layer count, the expert count, a vision
tower's depth) become a placeholder named after that field; indices that no field scales
(``self_attn.0`` / ``self_attn.1`` of a layer with two attention blocks) stay literal.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Mapping

_INDEX = re.compile(r"^(?P<stem>[A-Za-z_]*?_)?(?P<index>\d+)$")


def split_index(component: str) -> tuple[str, int] | None:
    """``"17"`` -> ("", 17); ``"expert_17"`` -> ("expert_", 17); other components -> None."""
    match = _INDEX.match(component)
    if match is None:
        return None
    return match["stem"] or "", int(match["index"])


def index_sites(names: Iterable[str]) -> dict[str, set[int]]:
    """For every *site* (the name prefix up to an index, earlier indices replaced by ``#``, plus the
    index stem), the set of index values seen."""
    sites: dict[str, set[int]] = defaultdict(set)
    for name in names:
        parts = name.split(".")
        normal: list[str] = []
        for part in parts:
            hit = split_index(part)
            if hit is None:
                normal.append(part)
                continue
            stem, index = hit
            sites[".".join([*normal, stem + "#"])].add(index)
            normal.append(stem + "#")
    return dict(sites)


def site_counts(names: Iterable[str]) -> dict[str, int]:
    """Sites whose indices are exactly ``range(n)``: site -> n (others are dropped)."""
    out = {}
    for site, values in index_sites(names).items():
        if values == set(range(len(values))):
            out[site] = len(values)
    return out


def template_of(name: str, placeholders: Mapping[str, str]) -> tuple[str, dict[str, int]]:
    """The template of a concrete name and the index value behind each placeholder.

    Args:
        name: a concrete tensor name.
        placeholders: site -> placeholder symbol, for the sites whose index is a placeholder.
    """
    parts = name.split(".")
    normal: list[str] = []
    out: list[str] = []
    indices: dict[str, int] = {}
    for part in parts:
        hit = split_index(part)
        if hit is None:
            normal.append(part)
            out.append(part)
            continue
        stem, index = hit
        site = ".".join([*normal, stem + "#"])
        symbol = placeholders.get(site)
        if symbol is None:
            out.append(part)
        else:
            out.append(f"{stem}{{{symbol}}}")
            indices[symbol] = index
        normal.append(stem + "#")
    return ".".join(out), indices
