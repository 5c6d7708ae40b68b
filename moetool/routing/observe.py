"""Observe the expert choices a transformers MoE model makes, at its router modules.

Hooks sit on the router module of each MoE layer (the registry says where it is and what it returns),
so they see exactly the top-k indices the model's own forward uses, whatever experts implementation
(fused 3-D weights, grouped_mm, kernels) runs afterwards. Where a router returns only logits (DBRX),
the family's rule is applied to them, as its MoE block does.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from moetool.arch.spec import FamilySpec, RouterOutput, Routing
from moetool.errors import UnsupportedArchitectureError


@dataclass
class RouterEvent:
    """One router call: logits [tokens, experts] and the chosen experts [tokens, top_k]."""

    layer: int
    logits: Any  # torch.Tensor
    indices: Any  # torch.LongTensor


def find_routers(model: Any, spec: FamilySpec) -> dict[int, Any]:
    """Router modules of an instantiated model, by decoder-layer index.

    Raises:
        UnsupportedArchitectureError: the model has no router where the registry says (an MoE
            family whose transformers implementation moved it).
    """
    pattern = re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\." + re.escape(spec.router_module) + r"\Z")
    routers: dict[int, Any] = {}
    for name, module in model.named_modules():
        match = pattern.search(name)
        if match:
            routers[int(match.group(1))] = module
    if not routers:
        raise UnsupportedArchitectureError(
            f"found no router modules named '*.{spec.router_module}' in this {spec.name} model",
            hint="the installed transformers may lay this family out differently; please report it",
        )
    return routers


def _top_k_of(module: Any, spec: FamilySpec, model_config: Any) -> int:
    for attr in ("top_k", "num_experts_per_tok"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    ffn = getattr(model_config, "ffn_config", None)  # DBRX keeps top-k in the nested ffn config
    if ffn is not None and isinstance(getattr(ffn, "moe_top_k", None), int):
        return ffn.moe_top_k
    return int(model_config.num_experts_per_tok)


def decode_router_output(output: Any, spec: FamilySpec, top_k: int) -> tuple[Any, Any]:
    """(logits, indices) from a router module's output, per the family's protocol."""
    import torch

    if spec.router_output is RouterOutput.LOGITS_WEIGHTS_INDICES:
        logits, _, indices = output
        return logits, indices
    if spec.router_output is RouterOutput.SCORES_LOGITS:
        _, logits = output
        # Llama-4's router selects the top-k logits; the scores it returns are -inf elsewhere.
        return logits, torch.topk(logits, top_k, dim=-1).indices
    if spec.router_output is RouterOutput.LOGITS:
        logits = output
        if spec.routing.rule is Routing.SOFTMAX_TOPK:
            probs = torch.softmax(logits, dim=-1, dtype=logits.dtype)
            return logits, torch.topk(probs, top_k, dim=-1).indices
        return logits, torch.topk(logits, top_k, dim=-1).indices
    raise ValueError(f"unknown router output protocol {spec.router_output}")


class RouterObserver:
    """Context manager that forwards every router call of a model to a callback.

    Args:
        model: an instantiated transformers causal LM of the family.
        spec: the family's registry entry.
        callback: called with a :class:`RouterEvent` for each router call, in forward order.
    """

    def __init__(self, model: Any, spec: FamilySpec, callback: Callable[[RouterEvent], None]) -> None:
        self.routers = find_routers(model, spec)
        self.spec = spec
        self.callback = callback
        self._config = model.config
        self._handles: list[Any] = []

    @property
    def layers(self) -> list[int]:
        """Indices of the MoE layers, ascending."""
        return sorted(self.routers)

    def __enter__(self) -> RouterObserver:
        for layer, module in self.routers.items():
            top_k = _top_k_of(module, self.spec, self._config)
            self._handles.append(module.register_forward_hook(self._hook(layer, top_k)))
        return self

    def _hook(self, layer: int, top_k: int) -> Callable[..., None]:
        def hook(_module: Any, _inputs: Any, output: Any) -> None:
            logits, indices = decode_router_output(output, self.spec, top_k)
            self.callback(
                RouterEvent(layer, logits.reshape(-1, logits.shape[-1]), indices.reshape(-1, indices.shape[-1]))
            )

        return hook

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
