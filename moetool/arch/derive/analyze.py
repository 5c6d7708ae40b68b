"""Analyse one model type: templates, fitted shapes, and per-layer presence, from meta-device probes.

The base probe is the config class's defaults (a few overrides, such as fewer layers), written out as
a complete config.json-like dict. Every other probe changes one or a few fields of that dict (doubled,
else halved, tripled or bumped) the way an edit of config.json would, and records the tensors
``save_pretrained`` would write.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from moetool.arch.derive import fit
from moetool.arch.derive.conditions import find_condition
from moetool.arch.derive.names import site_counts, template_of
from moetool.arch.derive.probe import Saved, make_config, numeric_fields, probe

#: Config fields that count layers of a stack (the text decoder, an encoder, a vision tower).
LAYER_FIELDS = (
    "num_hidden_layers",
    "num_layers",
    "n_layers",
    "num_decoder_layers",
    "encoder_layers",
    "decoder_layers",
    "depth",
)

#: Config fields that count routed experts, in the order of preference.
EXPERT_FIELDS = (
    "num_local_experts",
    "num_experts",
    "n_routed_experts",
    "moe_num_experts",
    "n_experts",
    "num_routed_experts",
)

#: Keys of a config dict that are no config fields (from_dict handles them or they are bookkeeping).
_DROP_KEYS = ("transformers_version", "_name_or_path", "architectures", "_commit_hash")


def _leaf(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def get_path(tree: Mapping[str, Any], dotted: str) -> Any:
    node: Any = tree
    for part in dotted.split("."):
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _with(tree: Mapping[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    out = dict(tree)
    head, _, rest = dotted.partition(".")
    if rest and not head.startswith("len:"):
        inner = out.get(head)
        out[head] = _with(inner if isinstance(inner, Mapping) else {}, rest, value)
        return out
    out[head] = value
    return out


def _resize(seq: Any, n: int) -> Any:
    """A per-layer list repeated (or cut) to ``n`` layers; a list of layer indices (each layer's
    source layer) is repeated with its indices shifted, so each block points into itself."""
    size = len(seq)
    # Only a list of layer indices (each below the length) is shifted; per-layer values (Laguna's
    # num_attention_heads_per_layer) are repeated as they are.
    indices = all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < size for v in seq)
    if isinstance(seq, list) and seq and indices:
        return [seq[i % size] + (i // size) * size for i in range(n)]
    items = [seq[i % size] for i in range(n)]
    return "".join(items) if isinstance(seq, str) else items


def apply_change(kwargs: Mapping[str, Any], name: str, value: Any) -> dict[str, Any]:
    """Set one (dotted) field; a layer count also resizes that config's per-layer lists, and a
    ``len:KEY`` pseudo-field resizes the list KEY."""
    parent, _, leaf = name.rpartition(".")
    node = get_path(kwargs, parent) if parent else kwargs
    if not isinstance(node, Mapping):
        return _with(kwargs, name, value)
    if leaf.startswith("each:"):
        key = leaf[5:]
        new_node = dict(node)
        new_node[key] = [value] * len(node[key])
        return _with(kwargs, parent, new_node) if parent else new_node
    if leaf.startswith("len:"):
        key = leaf[4:]
        new_node = dict(node)
        new_node[key] = _resize(node[key], int(value))
        return _with(kwargs, parent, new_node) if parent else new_node
    new_node = dict(node)
    old = node.get(leaf)
    new_node[leaf] = value
    if leaf in LAYER_FIELDS and isinstance(old, int) and isinstance(value, int):
        for key, seq in node.items():
            # Per-layer lists, and pattern strings (one character per layer); not any string that
            # happens to be as long (model_type "phimoe" has six characters).
            per_layer = isinstance(seq, list) or (isinstance(seq, str) and "pattern" in key)
            if per_layer and len(seq) == old and key != leaf and old > 1:
                new_node[key] = _resize(seq, value)
            elif isinstance(seq, Mapping) and seq and all(isinstance(k, str) and k.isdigit() for k in seq):
                # Per-layer overrides keyed by layer index ("05": {...}): repeat them block by block.
                width = len(next(iter(seq)))
                new_node[key] = {
                    str(int(k) + block * old).zfill(width): v
                    for block in range(-(-value // old))
                    for k, v in seq.items()
                    if int(k) + block * old < value
                }
    return _with(kwargs, parent, new_node) if parent else new_node


@dataclass
class Probe:
    """One built config: which fields were changed, the resulting numeric fields, and the saved tensors."""

    changed: frozenset[str]
    fields: dict[str, float]
    config: dict[str, Any]
    saved: dict[str, Saved]


def _candidates(value: float) -> list[float]:
    if isinstance(value, int):
        if value == 0:
            return [1, 2]
        out = [value * 2]
        if value % 2 == 0:
            out.append(value // 2)
        out += [value * 3, value + 1]
        return out
    return [value * 2, value / 2] if value else [1.0]


def _computed_fields(model_type: str, base_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Top-level fields the config class declares as ``"auto"`` or ``None`` and fills in itself (numbers
    in ``to_dict``), with their declared defaults."""
    import dataclasses

    from moetool.arch.derive.probe import config_class

    cls = config_class(model_type)
    if not dataclasses.is_dataclass(cls):
        return {}
    out = {}
    for item in dataclasses.fields(cls):
        default = item.default
        value = base_kwargs.get(item.name)
        if (default is None or default == "auto") and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[item.name] = default
    return out


class Prober:
    """Builds (and caches) probes of a model type around a base config dict."""

    def __init__(self, model_type: str, overrides: Mapping[str, Any]) -> None:
        self.model_type = model_type
        self.overrides = dict(overrides)
        config = make_config(model_type, overrides).to_dict()
        self.base_kwargs = {k: v for k, v in config.items() if k not in _DROP_KEYS}
        self.computed = _computed_fields(model_type, self.base_kwargs)
        self.recompute: set[str] = set()  # fields whose probes let the class recompute ``computed``
        self._cache: dict[frozenset[str], Probe | None] = {}
        self.errors: dict[frozenset[str], str] = {}
        self.new_values: dict[str, float] = {}
        self.coupled: dict[str, str] = {}  # field -> the partner its probes change with it
        self.messages: dict[frozenset[str], str] = {}  # full error text of the probes that failed
        self.text_prefix = ""
        self.layer_field = ""
        base = self._build(frozenset(), self.base_kwargs)
        if base is None:
            raise RuntimeError(f"{model_type}: the base config does not build: {self.errors.get(frozenset())}")
        self.base = base

    def _build(self, changed: frozenset[str], kwargs: Mapping[str, Any]) -> Probe | None:
        try:
            config, saved = probe(self.model_type, kwargs)
            config_dict = config.to_dict()
        except Exception as exc:  # a config the class or the model refuses: no probe there
            text = str(exc).strip().splitlines()
            self.errors[changed] = f"{type(exc).__name__}: {text[0][:200] if text else ''}"
            self.messages[changed] = self.messages.get(changed, "") + str(exc)[:2000] + "\n"
            return None
        return Probe(changed, numeric_fields(config_dict), config_dict, saved)

    def get(self, changed: frozenset[str]) -> Probe | None:
        if changed in self._cache:
            return self._cache[changed]
        result: Probe | None = None
        if len(changed) == 1:
            (name,) = changed
            for value in _candidates(self.base.fields[name]):
                candidate = self._build(changed, apply_change(self.base_kwargs, name, value))
                # A change the config class overrides (a derived field) is no probe of that field.
                if candidate is not None and candidate.fields.get(name) != self.base.fields.get(name):
                    self.new_values[name] = value
                    result = candidate
                    break
            if result is None and self.computed and name not in self.computed:
                # The change conflicts with a field the class computed from it (Granite-4 hybrid's
                # mamba_d_head from hidden_size): let the class compute that one again.
                recomputed = {**self.base_kwargs, **self.computed}
                for value in _candidates(self.base.fields[name]):
                    candidate = self._build(changed, apply_change(recomputed, name, value))
                    if candidate is not None and candidate.fields.get(name) != self.base.fields.get(name):
                        self.new_values[name] = value
                        self.recompute.add(name)
                        result = candidate
                        break
            if result is None:
                result = self._coupled(name)
        elif changed:
            singles = [self.get(frozenset([name])) for name in sorted(changed)]
            if all(s is not None for s in singles):
                kwargs = self._start(changed)
                for name in sorted(changed):
                    kwargs = apply_change(kwargs, name, self.new_values[name])
                    if name in self.coupled:
                        kwargs = apply_change(kwargs, self.coupled[name], self.new_values[name])
                result = self._build(changed, kwargs)
        else:
            result = self.base
        self._cache[changed] = result
        return result

    def _coupled(self, name: str) -> Probe | None:
        """A field the config class requires equal to another (MuSE-Spark: ``audio_config.out_hidden_size``
        must match ``text_config.hidden_size``) is probed together with that partner: the language
        model's field carries the change (the partner then stands for it), a partner outside the
        language model is left unprobed."""
        value = self.base.fields[name]
        if not isinstance(value, int) or value < 2:
            return None
        # Only a partner the class's own error names (``... must match `text_config.hidden_size```).
        message = self.messages.get(frozenset([name]), "")
        partners = [
            other
            for other, v in self.base.fields.items()
            if other != name and v == value and "len:" not in other and "each:" not in other and other in message
        ]
        mine = bool(self.text_prefix) and name.startswith(self.text_prefix) and "." not in name[len(self.text_prefix) :]
        for other in partners:
            theirs = bool(self.text_prefix) and other.startswith(self.text_prefix)
            if (theirs and not mine) or other in self.coupled:
                continue  # the partner carries the change (the language model's field, or the first probed)
            for new in _candidates(value):
                kwargs = apply_change(apply_change(self.base_kwargs, name, new), other, new)
                candidate = self._build(frozenset([name]), kwargs)
                if candidate is not None and candidate.fields.get(name) == new:
                    self.new_values[name] = new
                    self.coupled[name] = other
                    return candidate
        return None

    def _start(self, names: frozenset[str]) -> dict[str, Any]:
        """The kwargs a multi-field probe changes: the base, with the computed fields left to the class
        when one of the fields needed that."""
        return {**self.base_kwargs, **self.computed} if names & self.recompute else self.base_kwargs

    def get_scaled(self, names: frozenset[str], factor: int) -> Probe | None:
        """A probe with every field in ``names`` multiplied by ``factor`` (an off-corner check point)."""
        key = frozenset(f"{name}*{factor}" for name in names)
        if key in self._cache:
            return self._cache[key]
        kwargs = self._start(names)
        for name in sorted(names):
            value = self.base.fields[name]
            kwargs = apply_change(kwargs, name, value * factor if value else factor)
            if name in self.coupled:
                kwargs = apply_change(kwargs, self.coupled[name], value * factor if value else factor)
        result = self._build(key, kwargs)
        self._cache[key] = result
        return result


@dataclass
class Variant:
    """One template (global, or relative to a layer stack), possibly one of several shape variants of
    the same name on different layers."""

    name: str
    per_layer: bool
    dtype: str
    when: str = "all"  # per-layer condition (see moetool.arch.layers)
    shapes: dict[frozenset[str], tuple[int, ...]] = field(default_factory=dict)
    exprs: list[fit.Expr] | None = None
    problem: str | None = None
    stack: int = 0
    tower: str | None = None  # a global template's block placeholder (config field) its ``when`` indexes


@dataclass
class StackInfo:
    """A layer stack: the decoder (or the encoder and the decoder of an encoder-decoder model)."""

    site: str  # e.g. "model.layers.#"
    field: str  # the config field counting its layers
    symbol: str  # "L" (first stack), "L2" (second)
    prefix: str  # e.g. "model.layers.{L}."
    moe_condition: str | None = None


@dataclass
class Analysis:
    """Everything :mod:`moetool.arch.derive.generate` needs to write a family entry."""

    model_type: str
    prober: Prober
    stacks: list[StackInfo]
    symbols: dict[str, str]  # site -> placeholder symbol
    placeholder_fields: dict[str, str]  # symbol -> config field
    expert_field: str | None
    variants: list[Variant]
    problems: list[str] = field(default_factory=list)

    @property
    def layer_field(self) -> str:
        return self.stacks[0].field

    @property
    def stack_prefix(self) -> str:
        return self.stacks[0].prefix

    @property
    def moe_condition(self) -> str | None:
        return self.stacks[0].moe_condition


def _placeholders(prober: Prober, fields: list[str]) -> dict[str, str]:
    """Sites whose index count is a config field that scales it: site -> field."""
    base_sites = site_counts(prober.base.saved)
    out: dict[str, str] = {}
    for site, count in base_sites.items():
        for name in fields:
            if prober.base.fields.get(name) != count:
                continue
            changed = prober.get(frozenset([name]))
            if changed is not None and site_counts(changed.saved).get(site) == changed.fields.get(name):
                out[site] = name
                break
        else:
            # One entry fewer than layers (Inkling-2's attn_res.attn_queries.{i} of layers 1..L-1):
            # a layer count with an offset, written "num_hidden_layers-1".
            for name in fields:
                if _leaf(name) not in LAYER_FIELDS:
                    continue
                offset = count - int(prober.base.fields.get(name) or 0)
                if offset not in (-1, 1):
                    continue
                changed = prober.get(frozenset([name]))
                if changed is not None and site_counts(changed.saved).get(site) == changed.fields.get(name) + offset:
                    out[site] = f"{name}{offset:+d}"
                    break
    return out


def split_offset(field: str) -> tuple[str, int]:
    """``"num_hidden_layers-1"`` -> ``("num_hidden_layers", -1)``; a plain field has offset 0."""
    for sign in ("-", "+"):
        head, found, tail = field.rpartition(sign)
        if found and tail.isdigit() and head:
            return head, int(sign + tail)
    return field, 0


def _order_fields(fields: Mapping[str, float]) -> list[str]:
    """Layer and expert fields first (they name the placeholders), then the rest."""

    def rank(name: str) -> tuple[int, str]:
        leaf = _leaf(name)
        if leaf in LAYER_FIELDS or leaf.startswith("len:"):
            return (0, name)
        if leaf in EXPERT_FIELDS:
            return (1, name)
        return (2, name)

    return sorted(fields, key=rank)


def _expert_field(fields: Mapping[str, float], text_prefix: str) -> str | None:
    for leaf in EXPERT_FIELDS:
        name = text_prefix + leaf
        if name in fields and fields[name] and fields[name] > 1:
            return name
    return None


def analyze(model_type: str, overrides: Mapping[str, Any], *, text_prefix: str = "") -> Analysis:
    """Probe a model type and fit its templates' shapes and per-layer conditions.

    Args:
        model_type: a transformers model type.
        overrides: config arguments of the base probe (a handful of layers; everything else default).
        text_prefix: ``"text_config."`` for multimodal wrappers whose language model is nested.
    """
    prober = Prober(model_type, overrides)
    prober.text_prefix = text_prefix
    base = prober.base
    fields = _order_fields(base.fields)
    site_field = _placeholders(prober, fields)
    problems: list[str] = []
    expert_field = _expert_field(base.fields, text_prefix)
    prober.text_prefix = text_prefix

    def is_layer_field(name: str) -> bool:
        leaf = _leaf(name)
        inner = name[len(text_prefix) :] if name.startswith(text_prefix) else None
        return inner is not None and "." not in inner and (leaf in LAYER_FIELDS or leaf.startswith("len:"))

    stack_sites = [s for s, f in site_field.items() if is_layer_field(f) and f != expert_field]
    expert_sites = [s for s, f in site_field.items() if f == expert_field]
    # Stacks holding routed experts (per-expert names under them, or any expert-looking tensor).
    holding = []
    for site in stack_sites:
        stem = site[:-1]
        if any(e.startswith(site + ".") for e in expert_sites) or any(
            n.startswith(stem) and _looks_routed_full(n) for n in base.saved
        ):
            holding.append(site)
    chosen: list[str] = []
    for site in sorted(holding or stack_sites, key=lambda s: _first_index(base.saved, s)):
        if site_field[site] not in {site_field[c] for c in chosen}:
            chosen.append(site)
    if not chosen:
        raise RuntimeError(f"{model_type}: found no layer stack (sites: {sorted(site_field.items())[:8]})")
    # Several sites may run over one count (a per-layer vector outside the layer modules); a stack is
    # the one with the most tensors.
    stacks: list[StackInfo] = []
    for index, site in enumerate(chosen):
        same = [s for s in stack_sites if site_field[s] == site_field[site]]
        main = max(same, key=lambda s: sum(1 for n in base.saved if n.startswith(s[:-1])))
        symbol = "L" if index == 0 else f"L{index + 1}"
        stacks.append(StackInfo(main, site_field[main], symbol, main[:-1] + "{" + symbol + "}."))
    symbols = {}
    for site, name in site_field.items():
        stack_symbol = next((st.symbol for st in stacks if st.field == name), None)
        symbols[site] = stack_symbol or ("E" if name == expert_field else name)

    stack_fields = {st.field for st in stacks}
    tower_symbols = {sym for site, sym in symbols.items() if sym not in ("E",) and site_field[site] not in stack_fields}
    tower_symbols -= {st.symbol for st in stacks}
    # Per probe: template key -> {layer or None: shape}; per-layer keys are "@<stack>@<name>".
    instances: dict[frozenset[str], dict[str, dict[int | None, tuple[int, ...]]]] = {}
    dtypes: dict[str, str] = {}

    def collect(probe_: Probe) -> dict[str, dict[int | None, tuple[int, ...]]]:
        if probe_.changed in instances:
            return instances[probe_.changed]
        seen: dict[str, dict[int | None, tuple[int, ...]]] = {}
        for name, saved in probe_.saved.items():
            template, indices = template_of(name, symbols)
            key, layer = template, None
            for index, stack in enumerate(stacks):
                if template.startswith(stack.prefix):
                    key = f"@{index}@" + template[len(stack.prefix) :]
                    layer = indices.get(stack.symbol)
                    break
            if layer is None:
                towers = [sym for sym in indices if sym in tower_symbols]
                if len(towers) == 1:
                    # A global template inside a block stack of its own (a vision tower's blocks):
                    # its shape per block index, for blocks that differ (windowed vs global attention).
                    by_block = seen.setdefault(TOWER_KEY + key, {})
                    block = indices[towers[0]]
                    if by_block.get(block, saved.shape) != saved.shape:
                        by_block[block] = (-1,)
                    else:
                        by_block[block] = saved.shape
            previous = seen.setdefault(key, {}).get(layer)
            if previous is not None and previous != saved.shape:
                seen[key][layer] = (-1,)  # instances of one name in one layer disagree: unfittable
            else:
                seen[key][layer] = saved.shape
            dtypes.setdefault(key, saved.dtype)
        instances[probe_.changed] = seen
        return seen

    collect(base)
    probes = [base]
    for name in fields:
        changed = prober.get(frozenset([name]))
        if changed is not None:
            collect(changed)
            probes.append(changed)

    prober.layer_field = stacks[0].field
    configs = _LazyConfigs(prober)
    counts = [_LazyLayers(prober, st.field) for st in stacks]

    # The MoE schedule of each stack: the layers holding routed-expert tensors.
    if expert_field is not None:
        for index, stack in enumerate(stacks):
            targets = {}
            for p in probes:
                layers: set[int] = set()
                experts = p.fields.get(expert_field)
                for key, by_layer in instances[p.changed].items():
                    if not key.startswith(f"@{index}@"):
                        continue
                    name = key.split("@", 2)[2]
                    # Routed experts: by name, or stacked on the first axis of a 3-D tensor (fused).
                    stacked = any(len(s) >= 3 and s[0] == experts for s in by_layer.values())
                    if _looks_routed(name) or (stacked and "shared" not in name):
                        layers.update(layer for layer in by_layer if layer is not None)
                targets[p.changed] = layers
            if any(targets.values()):
                stack.moe_condition = find_condition(targets, configs, counts[index])
                if stack.moe_condition is None:
                    problems.append(f"no rule explains which layers of {stack.prefix} hold routed experts")

    variants: list[Variant] = []
    for key in instances[frozenset()]:
        if key.startswith(TOWER_KEY):
            continue
        if not key.startswith("@") and instances[frozenset()][key].get(None) == (-1,):
            split = _tower_variants(key, dtypes[key], probes, instances, prober, tower_symbols, problems)
            if split:
                variants.extend(split)
                continue
        if not key.startswith("@"):
            variant = Variant(key, False, dtypes[key])
            for p in probes:
                shape = instances[p.changed].get(key, {}).get(None)
                if shape is not None:
                    variant.shapes[p.changed] = shape
            variants.append(variant)
            continue
        _, index_text, name = key.split("@", 2)
        index = int(index_text)
        found = _per_layer_variants(
            key, name, dtypes[key], probes, instances, configs, counts[index], stacks[index].moe_condition, problems
        )
        for variant in found:
            variant.stack = index
        variants.extend(found)

    for variant in variants:
        if variant.problem:
            continue
        if any(-1 in shape for shape in variant.shapes.values()):
            variant.problem = "instances of this name differ in shape within one layer"
            problems.append(f"{variant.name}: {variant.problem}")
            continue
        exprs = []
        for axis in range(len(variant.shapes[frozenset()])):
            expr = _fit_axis(prober, variant, axis, fields, instances, collect, configs, counts[variant.stack])
            if expr is None:
                variant.problem = f"no expression fits axis {axis} of shape {variant.shapes[frozenset()]}"
                problems.append(f"{variant.name} [{variant.when}]: {variant.problem}")
                break
            exprs.append(expr)
        else:
            variant.exprs = exprs

    placeholder_fields = {sym: site_field[site] for site, sym in symbols.items()}
    return Analysis(
        model_type=model_type,
        prober=prober,
        stacks=stacks,
        symbols=symbols,
        placeholder_fields=placeholder_fields,
        expert_field=expert_field,
        variants=variants,
        problems=problems,
    )


def _first_index(saved: Mapping[str, Any], site: str) -> int:
    stem = site[:-1]
    return next((i for i, n in enumerate(saved) if n.startswith(stem)), len(saved))


def _looks_routed_full(name: str) -> bool:
    parts = name.lower().split(".")
    return any(p == "experts" or p.startswith("expert_") for p in parts) and not any("shared" in p for p in parts)


def key_of(variant: Variant) -> str:
    return f"@{variant.stack}@{variant.name}" if variant.per_layer else variant.name


def _text(config: Mapping[str, Any], text_prefix: str) -> Mapping[str, Any]:
    if not text_prefix:
        return config
    node = get_path(config, text_prefix.rstrip("."))
    return node if isinstance(node, Mapping) else {}


def _layer_count(p: Probe, layer_field: str) -> int:
    value = p.fields.get(layer_field)
    return int(value) if value is not None else 0


def _looks_routed(name: str) -> bool:
    """A per-layer template of the routed experts (the MoE schedule is read from where these are)."""
    from moetool.arch.derive.categories import is_routed_name

    return is_routed_name(name)


def _per_layer_variants(
    key: str,
    name: str,
    dtype: str,
    probes: list[Probe],
    instances: Mapping[frozenset[str], Mapping[str, Mapping[int | None, tuple[int, ...]]]],
    configs: Mapping[frozenset[str], Mapping[str, Any]],
    layer_count: Mapping[frozenset[str], int],
    moe_condition: str | None,
    problems: list[str],
) -> list[Variant]:
    """Split a per-layer template into shape variants, each with the condition selecting its layers."""
    base_layers = instances[frozenset()][key]
    # Layers whose shapes agree in every probe form one variant (two attention kinds may give equal
    # shapes at the base and different ones once a field of only one of them changes).
    # (A layer without the tensor in some probe, a dense layer there, does not split a group.)
    groups: dict[tuple[Any, ...], set[int]] = {}
    signatures: dict[Any, dict[frozenset[str], tuple[int, ...]]] = {}
    for layer in base_layers:
        signatures[layer] = {
            p.changed: shape for p in probes if (shape := instances[p.changed].get(key, {}).get(layer)) is not None
        }
    for layer in sorted(base_layers, key=lambda ly: ly if ly is not None else -1):
        mine = signatures[layer]
        for representative, members in groups.items():
            theirs = signatures[representative[0]]
            if all(theirs[k] == v for k, v in mine.items() if k in theirs):
                members.add(layer)  # type: ignore[arg-type]
                break
        else:
            groups[(layer,)] = {layer}  # type: ignore[arg-type]
    out = []
    if len(groups) == 1:
        targets = {p.changed: {ly for ly in instances[p.changed].get(key, {}) if ly is not None} for p in probes}
        when = find_condition(targets, configs, layer_count, prefer=moe_condition)
        variant = Variant(name, True, dtype, when or "all")
        if when is None:
            variant.problem = f"no rule explains the layers that have it ({sorted(targets[frozenset()])})"
            problems.append(f"{name}: {variant.problem}")
        for p in probes:
            shapes = set(instances[p.changed].get(key, {}).values())
            if len(shapes) == 1:
                variant.shapes[p.changed] = shapes.pop()
            elif len(shapes) > 1:
                variant.shapes[p.changed] = (-1,)
        return [variant]
    # Several shapes: find a condition for each group on the base probe, then read each group's shape
    # in the other probes from the layers its condition selects.
    for _signature, layers in sorted(groups.items(), key=lambda kv: min(kv[1])):
        shape = base_layers[min(layers)]
        when = find_condition(
            {frozenset(): layers}, {frozenset(): configs[frozenset()]}, layer_count, prefer=moe_condition
        )
        variant = Variant(name, True, dtype, when or "all")
        if when is None:
            variant.problem = f"no rule explains the layers of shape {shape} ({sorted(layers)})"
            problems.append(f"{name}: {variant.problem}")
            out.append(variant)
            continue
        from moetool.arch.layers import select_layers

        for p in probes:
            try:
                chosen = select_layers(when, configs[p.changed], layer_count[p.changed])
            except Exception:
                continue
            by_layer = instances[p.changed].get(key, {})
            shapes = {by_layer.get(ly) for ly, on in enumerate(chosen) if on}
            shapes.discard(None)
            if len(shapes) == 1:
                variant.shapes[p.changed] = shapes.pop()  # type: ignore[assignment]
            elif len(shapes) > 1:
                variant.shapes[p.changed] = (-1,)
        out.append(variant)
    return out


#: Prefix of the per-block shapes of a global template in ``instances`` (see :func:`_tower_variants`).
TOWER_KEY = "#block#"


def _tower_node(prober: Prober, changed: frozenset[str], field: str) -> tuple[Mapping[str, Any], int] | None:
    """The config node holding a block stack's count field, and the count, in one probe (for a layer
    count with an offset, ``num_hidden_layers-1``, the layer count: blocks map to layers by the offset)."""
    field = split_offset(field)[0]
    probe_ = prober.get(changed)
    if probe_ is None or field not in probe_.fields:
        return None
    parent = field.rsplit(".", 1)[0] if "." in field else ""
    node = get_path(probe_.config, parent) if parent else probe_.config
    return (node, int(probe_.fields[field])) if isinstance(node, Mapping) else None


def _tower_variants(
    key: str,
    dtype: str,
    probes: list[Probe],
    instances: Mapping[frozenset[str], Mapping[str, Mapping[int | None, tuple[int, ...]]]],
    prober: Prober,
    tower_symbols: set[str],
    problems: list[str],
) -> list[Variant]:
    """Split a global template whose blocks differ in shape (a SAM encoder's global-attention blocks,
    listed in ``global_attn_indexes``, against its windowed ones) into one variant per layer
    condition over the block stack's own config node; [] when it is not such a template."""
    towers = [sym for sym in tower_symbols if "{" + sym + "}" in key]
    by_block = instances[frozenset()].get(TOWER_KEY + key)
    if len(towers) != 1 or not by_block or any(shape == (-1,) for shape in by_block.values()):
        return []
    field = towers[0]
    groups: dict[tuple[int, ...], set[int]] = {}
    for block, shape in sorted(by_block.items()):  # type: ignore[type-var]
        groups.setdefault(shape, set()).add(block)  # type: ignore[arg-type]
    out = []
    for shape, blocks in sorted(groups.items(), key=lambda kv: min(kv[1])):
        base = _tower_node(prober, frozenset(), field)
        if base is None:
            return []
        shift = split_offset(field)[1]  # block i is layer i - shift (attn_queries.{i} of layer i+1)
        layers = {block - shift for block in blocks}
        when = find_condition({frozenset(): layers}, {frozenset(): base[0]}, {frozenset(): base[1]})
        if when is None and shift:
            # Layers without a block (the first, for L-1 entries) may go either way.
            unmapped = {layer for layer in range(base[1]) if not 0 <= layer + shift < base[1] + shift}
            targets = {frozenset(): layers | unmapped}
            when = find_condition(targets, {frozenset(): base[0]}, {frozenset(): base[1]})
        variant = Variant(key, False, dtype, when or "all", tower=field)
        if when is None:
            variant.problem = f"no rule over its block config explains the blocks of shape {shape} ({sorted(blocks)})"
            problems.append(f"{key}: {variant.problem}")
            out.append(variant)
            continue
        for p in probes:
            got = _tower_shape(variant, p.changed, instances, prober)
            if got is not None:
                variant.shapes[p.changed] = got
        out.append(variant)
    return out


def _tower_shape(
    variant: Variant,
    changed: frozenset[str],
    instances: Mapping[frozenset[str], Mapping[str, Mapping[int | None, tuple[int, ...]]]],
    prober: Prober,
) -> tuple[int, ...] | None:
    from moetool.arch.layers import select_layers

    assert variant.tower is not None
    node = _tower_node(prober, changed, variant.tower)
    by_block = instances.get(changed, {}).get(TOWER_KEY + variant.name, {})
    if node is None or not by_block:
        return None
    try:
        chosen = select_layers(variant.when, node[0], node[1])
    except Exception:
        return None
    shift = split_offset(variant.tower)[1]
    shapes = {by_block.get(layer + shift) for layer, on in enumerate(chosen) if on} - {None}
    return shapes.pop() if len(shapes) == 1 else None  # type: ignore[return-value]


def _variant_shape(
    variant: Variant,
    changed: frozenset[str],
    instances: Mapping[frozenset[str], Mapping[str, Mapping[int | None, tuple[int, ...]]]],
    configs: Mapping[frozenset[str], Mapping[str, Any]],
    layer_count: Mapping[frozenset[str], int],
    prober: Prober | None = None,
) -> tuple[int, ...] | None:
    if variant.tower is not None and prober is not None:
        return _tower_shape(variant, changed, instances, prober)
    by_layer = instances[changed].get(key_of(variant), {})
    if not variant.per_layer:
        return by_layer.get(None)
    if variant.when == "all" or not by_layer:
        shapes = set(by_layer.values())
    else:
        from moetool.arch.layers import select_layers

        try:
            chosen = select_layers(variant.when, configs[changed], layer_count[changed])
        except Exception:
            return None
        shapes = {by_layer.get(ly) for ly, on in enumerate(chosen) if on} - {None}
    return shapes.pop() if len(shapes) == 1 else None  # type: ignore[return-value]


def _check_remainder(
    prober: Prober,
    variant: Variant,
    axis: int,
    expr: fit.Expr,
    collect: Any,
    instances: dict[frozenset[str], Any],
    configs: dict[frozenset[str], Mapping[str, Any]],
    layer_count: dict[frozenset[str], int],
) -> fit.Expr | fit.Rounded:
    """A monomial with a fractional coefficient (``downsample_hidden_size*num_mel_bins/8``) is checked
    where its field does not divide evenly (the field plus one); a strided reduction there rounds
    (``downsample_hidden_size*ceil(num_mel_bins/8)``), and the rounded form that matches replaces it.
    Where no such probe builds, or none matches, the monomial stays (checked on every probe as before)."""
    candidates = fit.rounded_candidates(expr)
    if not candidates:
        return expr
    for name in sorted({c.field for c in candidates}):
        base = prober.base.fields[name]
        if not isinstance(base, int):
            continue
        key = frozenset([f"{name}+1"])
        if key not in prober._cache:
            prober._cache[key] = prober._build(key, apply_change(prober.base_kwargs, name, base + 1))
        off = prober._cache[key]
        if off is None or off.fields.get(name) != base + 1:
            continue
        collect(off)
        shape = _variant_shape(variant, key, instances, configs, layer_count, prober)
        if shape is None or len(shape) <= axis or expr.value(off.fields) == shape[axis]:
            continue
        for candidate in candidates:
            if candidate.field == name and candidate.value(off.fields) == shape[axis]:
                variant.shapes[key] = shape
                return candidate
    return expr


def _fit_axis(
    prober: Prober,
    variant: Variant,
    axis: int,
    fields: list[str],
    instances: dict[frozenset[str], Any],
    collect: Any,
    configs: dict[frozenset[str], Mapping[str, Any]],
    layer_count: dict[frozenset[str], int],
) -> fit.Expr | fit.Patches | fit.Rounded | fit.FloatProduct | None:
    base_value = variant.shapes[frozenset()][axis]
    base_fields = prober.base.fields
    ratios: dict[str, tuple[Fraction, Fraction]] = {}
    for name in fields:
        shape = variant.shapes.get(frozenset([name]))
        if shape is None or len(shape) <= axis:
            continue
        if shape[axis] != base_value:
            changed = prober.get(frozenset([name]))
            assert changed is not None
            field_ratio = (
                Fraction(changed.fields[name]) / Fraction(base_fields[name]) if base_fields[name] else Fraction(0)
            )
            ratios[name] = (field_ratio, Fraction(shape[axis], base_value) if base_value else Fraction(-1))
    expr = None
    if base_value and all(r[0] > 0 for r in ratios.values()):
        expr = fit.fit_monomial(base_value, base_fields, ratios)
        if expr is not None:
            expr = _check_remainder(prober, variant, axis, expr, collect, instances, configs, layer_count)
    if expr is None:
        support = sorted(ratios)

        def corner(changed: frozenset[str]) -> tuple[Mapping[str, float], int] | None:
            probe_ = prober.get(changed)
            if probe_ is None:
                return None
            if changed not in instances:
                collect(probe_)
            shape = _variant_shape(variant, changed, instances, configs, layer_count, prober)
            if shape is not None:
                variant.shapes[changed] = shape
            return None if shape is None or len(shape) <= axis else (probe_.fields, shape[axis])

        expr = fit.fit_multilinear(support, corner)
        if expr is None:
            # A field the dimension falls with (a head count dividing the width) may enter as 1/x.
            inverse = frozenset(f for f, (field_ratio, ratio) in ratios.items() if (field_ratio > 1) != (ratio > 1))
            if inverse:
                expr = fit.fit_multilinear(support, corner, inverse)
        if expr is not None and len(support) > 1:
            # 2**n corners fit any multilinear form exactly: check one point off the corners.
            for factor in (3, 5):
                off = prober.get_scaled(frozenset(support), factor)
                if off is None:
                    continue
                collect(off)
                shape = _variant_shape(variant, off.changed, instances, configs, layer_count, prober)
                if shape is not None and len(shape) > axis and expr.value(off.fields) != shape[axis]:
                    expr = None  # not multilinear after all
                break
        if expr is None:
            points = [
                (probe_.fields, shape[axis])
                for changed, shape in variant.shapes.items()
                if (probe_ := prober.get(changed)) is not None and len(shape) > axis
            ]
            expr = fit.fit_patches(support, points) or fit.fit_float_product(support, points)
    if expr is None:
        return None
    # Check the fit against every probe that has this tensor.
    for changed, shape in variant.shapes.items():
        probe_ = prober.get(changed)
        if probe_ is None or len(shape) <= axis:
            continue
        try:
            predicted = expr.value(probe_.fields)
        except (KeyError, ZeroDivisionError):
            return None
        if predicted != shape[axis]:
            return None
    return expr


class _LazyConfigs(dict):
    """changed -> the probe's text config (built on first use)."""

    def __init__(self, prober: Prober) -> None:
        super().__init__()
        self.prober = prober

    def __missing__(self, changed: frozenset[str]) -> Mapping[str, Any]:
        probe_ = self.prober.get(changed)
        value = _text(probe_.config, self.prober.text_prefix) if probe_ is not None else {}
        self[changed] = value
        return value


class _LazyLayers(dict):
    """changed -> the probe's layer count (of one stack)."""

    def __init__(self, prober: Prober, layer_field: str) -> None:
        super().__init__()
        self.prober = prober
        self.layer_field = layer_field

    def __missing__(self, changed: frozenset[str]) -> int:
        probe_ = self.prober.get(changed)
        value = _layer_count(probe_, self.layer_field) if probe_ is not None else 0
        self[changed] = value
        return value
