"""Find, by running a tiny model, where a family routes tokens: the experts module that receives the
top-k indices and the router module whose output holds the logits, in each layer stack."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

_LAYER = re.compile(r"^(?P<path>.+?)\.(?P<layer>\d+)\.(?P<rest>.+)$")


@dataclass
class StackRouting:
    """Where one layer stack routes: module paths relative to a layer of ``layers_module``."""

    layers_module: str  # in-memory path of the layer list, e.g. "model.layers"
    experts_module: str  # e.g. "mlp.experts"
    router_module: str | None  # e.g. "mlp.gate"
    moe_layers: list[int] = field(default_factory=list)


@dataclass
class RoutingInfo:
    """What a forward pass showed about one family's routing."""

    stacks: list[StackRouting]
    top_k: int
    num_choices: int  # width of the router logits (experts, plus any zero-compute slots)
    protocol: str = "experts_input"


def _int_2d(value: Any, num_experts: int) -> Any:
    import torch

    is_index = isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point()
    if is_index and value.numel() and value.dtype != torch.bool and int(value.min()) >= 0:
        return value if value.shape[1] <= num_experts else None
    return None


def _float_last(value: Any, width: int, tokens: int) -> Any:
    """A float tensor [..., width'] with width' >= width over ``tokens`` positions, inside an output."""
    import torch

    items = value if isinstance(value, (tuple, list)) else (value,)
    for item in items:
        is_scores = isinstance(item, torch.Tensor) and item.is_floating_point() and item.dim() >= 2
        if is_scores and item.shape[-1] >= width and item.numel() // item.shape[-1] == tokens:
            return item
    return None


def _record(model: Any, run: Any) -> list[tuple[str, str, Any]]:
    """Every module call of one forward pass, in order: ("pre", name, (args, kwargs)) / ("post", name, out)."""
    import torch

    calls: list[tuple[str, str, Any]] = []
    handles = []
    # Its own hooks, not the Observer's: this records every module of an unknown family to find its
    # routers, before there is a registry entry for moetool.runner.observe to watch through.
    for name, module in model.named_modules():
        if not name:
            continue
        handles.append(
            module.register_forward_pre_hook(
                lambda _m, args, kwargs, n=name: calls.append(("pre", n, (args, kwargs))), with_kwargs=True
            )
        )
        handles.append(module.register_forward_hook(lambda _m, _a, out, n=name: calls.append(("post", n, out))))
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    return calls


def discover(
    model: Any, input_ids: Any, num_experts: int, *, protocol: str | None = None, **inputs: Any
) -> RoutingInfo | None:
    """Run ``model`` once on ``input_ids`` with hooks on every module and read the routing off the calls.

    Args:
        model: a tiny model of the family, in eval mode.
        input_ids: [batch, length] token ids (the decoder gets ``inputs``).
        num_experts: the routed-expert count of its config.
        protocol: ``None`` to find the experts module that receives top-k indices; a router protocol
            of the registry (``switch_mask``/``nllb_mask``) for families whose experts receive masks:
            then the router modules are found by name (``router``) and the experts module is their
            sibling ``experts``.

    Returns:
        None when no module received top-k indices (the family routes some other way).
    """
    calls = _record(model, lambda: model(input_ids=input_ids, **inputs))
    if protocol is not None:
        return _discover_masks(model, calls, num_experts, protocol)
    # Token counts differ between the stacks of an encoder-decoder model.
    tokens = {int(input_ids.numel())} | {int(v.numel()) for v in inputs.values() if hasattr(v, "numel")}
    experts: dict[str, Any] = {}
    for kind, name, payload in calls:
        if kind != "pre" or name in experts or _LAYER.match(name) is None:
            continue
        args, kwargs = payload
        for value in list(args) + list(kwargs.values()):
            indices = _int_2d(value, num_experts)
            if indices is not None and indices.shape[0] in tokens:
                module = model.get_submodule(name)
                if any(True for _ in module.parameters()):
                    experts[name] = indices
                break
    if not experts:
        return None
    # Drop modules nested in another experts module (an inner implementation receiving the same indices).
    outer = {n: v for n, v in experts.items() if not any(n.startswith(o + ".") for o in experts if o != n)}
    by_path: dict[str, dict[int, str]] = {}
    for name in outer:
        match = _LAYER.match(name)
        if match is None:
            return None
        by_path.setdefault(match["path"], {})[int(match["layer"])] = match["rest"]
    widths = {int(v.shape[1]) for v in outer.values()}
    if len(widths) != 1:
        return None
    stacks = []
    num_choices = num_experts
    for path, rels in by_path.items():
        if len(set(rels.values())) != 1:
            return None
        rel = next(iter(rels.values()))
        first = min(rels)
        router, width = _router_before(calls, f"{path}.{first}.", f"{path}.{first}.{rel}", num_experts)
        if width:
            num_choices = width
        stacks.append(StackRouting(path, rel, router, sorted(rels)))
    return RoutingInfo(stacks, widths.pop(), num_choices)


def _router_before(
    calls: list[tuple[str, str, Any]], layer_prefix: str, experts_name: str, num_experts: int
) -> tuple[str | None, int]:
    """The router: a module of the same MoE block, called before the experts module, not inside it,
    whose output holds float scores over at least num_experts choices; the outermost such module."""
    candidates = []
    block = experts_name.rsplit(".", 1)[0] + "."
    for kind, name, payload in calls:
        if name == experts_name and kind == "pre":
            break
        if kind != "post" or not name.startswith(block) or experts_name.startswith(name + "."):
            continue
        items = payload if isinstance(payload, (tuple, list)) else (payload,)
        for item in items:
            shape = getattr(item, "shape", None)
            floating = getattr(item, "is_floating_point", lambda: False)()
            # Within the MoE block: the scores over the experts, plus any zero-compute slots.
            if floating and shape is not None and len(shape) >= 2 and num_experts <= shape[-1] <= 64 * num_experts:
                candidates.append((name, int(shape[-1])))
                break
    else:
        return None, 0
    if not candidates:
        return None, 0
    exact = [c for c in candidates if c[1] == num_experts]
    name, width = min(exact or candidates, key=lambda c: (c[0].count("."), c[1]))
    return name[len(layer_prefix) :], width


def _discover_masks(
    model: Any, calls: list[tuple[str, str, Any]], num_experts: int, protocol: str
) -> RoutingInfo | None:
    routers: dict[str, dict[int, str]] = {}
    for kind, name, _payload in calls:
        if kind != "post" or not name.endswith(".router"):
            continue
        match = _LAYER.match(name)
        if match is None:
            continue
        routers.setdefault(match["path"], {})[int(match["layer"])] = match["rest"]
    stacks = []
    for path, rels in routers.items():
        rel_set = set(rels.values())
        if len(rel_set) != 1:
            return None
        rel = rel_set.pop()
        experts = rel.rsplit(".", 1)[0] + ".experts"
        first = min(rels)
        try:
            model.get_submodule(f"{path}.{first}.{experts}")
        except AttributeError:
            return None
        stacks.append(StackRouting(path, experts, rel, sorted(rels)))
    if not stacks:
        return None
    top_k = 1 if protocol == "switch_mask" else 2
    return RoutingInfo(stacks, top_k, num_experts, protocol)
