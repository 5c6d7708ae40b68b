"""What a transformers MoE model's routers are and what their outputs mean (family knowledge).

The hooks themselves are :class:`moetool.runner.observe.Observer`'s (the one observation path); this
module finds the modules it hooks and decodes what they return. Hooks sit on the router module of each
MoE layer (the registry says where it is and what it returns), so they see exactly the top-k indices the
model's own forward uses, whatever experts implementation (fused 3-D weights, grouped_mm, kernels) runs
afterwards. Where a router returns only logits (DBRX), the family's rule is applied to them, as its MoE
block does. For the families derived from transformers (:mod:`moetool.arch.derived`) the choices are
read where the model consumes them: the top-k indices its experts module receives, paired with the
logits of the router module that ran just before it in the same layer.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from moetool.arch.dims import get_path
from moetool.arch.spec import FamilySpec, RouterOutput, Routing
from moetool.errors import UnsupportedArchitectureError

if TYPE_CHECKING:
    import torch


def _layer_pattern(spec: FamilySpec, module: str) -> re.Pattern[str]:
    if spec.layers_module:
        return re.compile("^" + re.escape(spec.layers_module) + r"\.(\d+)\." + re.escape(module) + r"\Z")
    return re.compile(r"(?:^|\.)(?:layers|blocks)\.(\d+)\." + re.escape(module) + r"\Z")


def find_modules(model: Any, spec: FamilySpec, module: str) -> dict[int, Any]:
    """Modules named ``module`` inside the decoder layers of an instantiated model, by layer index.

    For encoder-decoder families ``module`` is ``"router"`` or ``"experts"`` and each stack's own
    module name is used; layers are numbered across the stacks (encoder first), as in ``inspect``.
    """
    if spec.stacks:
        from moetool.arch.dims import resolve_dims

        starts = resolve_dims(spec, model.config.to_dict()).stack_starts
        found: dict[int, Any] = {}
        for stack, start in zip(spec.stacks, starts, strict=True):
            name = stack.router_module if module == "router" else stack.experts_module
            pattern = re.compile("^" + re.escape(stack.layers_module) + r"\.(\d+)\." + re.escape(name) + r"\Z")
            for path, candidate in model.named_modules():
                match = pattern.search(path)
                if match:
                    found[start + int(match.group(1))] = candidate
        return found
    pattern = _layer_pattern(spec, module)
    found = {}
    for name, candidate in model.named_modules():
        match = pattern.search(name)
        if match:
            found[int(match.group(1))] = candidate
    return found


def find_routers(model: Any, spec: FamilySpec) -> dict[int, Any]:
    """Router modules of an instantiated model, by decoder-layer index.

    Raises:
        UnsupportedArchitectureError: the model has no router where the registry says (an MoE
            family whose transformers implementation moved it).
    """
    routers = find_modules(model, spec, "router" if spec.stacks else spec.router_module)
    if not routers:
        raise UnsupportedArchitectureError(
            f"found no router modules named '*.{spec.router_module}' in this {spec.name} model",
            hint="the installed transformers may lay this family out differently; please report it",
        )
    return routers


def router_top_k(module: Any, spec: FamilySpec, model_config: Any) -> int:
    """How many experts a router module picks per token.

    The module's own ``top_k`` when it has one, else the first of the registry's top-k config keys
    (``spec.fields["K"]``, dotted: DBRX keeps it in ``ffn_config.moe_top_k``) present on the loaded
    model's config, else ``num_experts_per_tok``.
    """
    for attr in ("top_k", "num_experts_per_tok"):
        value = getattr(module, attr, None)
        if isinstance(value, int):
            return value
    for key in spec.fields.get("K", ()):
        value = _config_value(model_config, key)
        if isinstance(value, int):
            return value
    return int(model_config.num_experts_per_tok)


def _config_value(config: Any, dotted: str) -> Any:
    """A dotted key of a transformers config object (nested configs are objects or dicts), or None."""
    node = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else getattr(node, part, None)
        if node is None:
            return None
    return node


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
    if spec.router_output in (RouterOutput.SWITCH_MASK, RouterOutput.NLLB_MASK):
        logits, indices, _ = decode_capacity_output(output, spec)
        return logits, indices
    raise ValueError(f"unknown router output protocol {spec.router_output}")


def decode_capacity_output(output: Any, spec: FamilySpec) -> tuple[Any, Any, Any]:
    """(logits, indices, kept) from the router of a capacity-limited family.

    Switch Transformers' router returns ``(dispatch mask [.., E] after the capacity drop, probability
    of the chosen expert, logits)``: the choice is the arg-max (top-1) and it was kept when its mask
    row is not empty. NLLB-MoE's returns ``(top-1 mask, combine weights [.., E] after the drop,
    logits)``: the choices are the top-1 and the best other expert (its ``second_expert_policy``
    ``"all"``), each kept when its combine weight is not zero. Both run at eval without jitter.
    """
    import torch

    if spec.router_output is RouterOutput.SWITCH_MASK:
        mask, _, logits = output
        logits = logits.reshape(-1, logits.shape[-1])
        indices = logits.argmax(dim=-1, keepdim=True)
        kept = mask.reshape(-1, mask.shape[-1]).sum(dim=-1, keepdim=True) > 0
        return logits, indices, kept
    _, weights, logits = output
    logits = logits.reshape(-1, logits.shape[-1])
    weights = weights.reshape(-1, weights.shape[-1])
    first = torch.softmax(logits.float(), dim=-1).argmax(dim=-1, keepdim=True)
    second = logits.masked_fill(torch.zeros_like(logits, dtype=torch.bool).scatter(1, first, True), float("-inf"))
    indices = torch.cat([first, second.argmax(dim=-1, keepdim=True)], dim=-1)
    kept = weights.gather(1, indices) > 0
    return logits, indices, kept


def routing_decision(
    output: Any, spec: FamilySpec, config: Mapping[str, Any], top_k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(logits, indices, weights)`` of one router call, as the MoE block applies them.

    Routers that return only logits (DBRX) or masked scores (Llama-4) get the family's rule applied.
    Capacity-limited routers (Switch, NLLB-MoE) are decoded as profile-routing decodes them; a choice
    dropped for capacity gets weight 0, as the model gives it.
    """
    import torch

    if spec.router_output.capacity_limited:
        logits, indices, kept = decode_capacity_output(output, spec)
        # Switch weighs its one expert by the softmax probability; NLLB returns its combine weights.
        switch = spec.router_output is RouterOutput.SWITCH_MASK
        scores = torch.softmax(logits.float(), dim=-1) if switch else output[1]
        return logits, indices, scores.reshape(logits.shape).gather(1, indices).float() * kept
    if spec.router_output is RouterOutput.LOGITS_WEIGHTS_INDICES:
        logits, weights, indices = output
    elif spec.router_output is RouterOutput.SCORES_LOGITS:
        scores, logits = output
        indices = torch.topk(logits, top_k, dim=-1).indices
        weights = scores.reshape(-1, scores.shape[-1]).gather(-1, indices.reshape(-1, top_k))
    else:
        logits = output
        probs = torch.softmax(logits.float(), dim=-1)
        weights, indices = torch.topk(probs, top_k, dim=-1)
        norm = get_path(config, spec.routing.renormalize_key) if spec.routing.renormalize_key else None
        if isinstance(norm, (int, float)) and not isinstance(norm, bool) and norm > 0:
            weights = weights / torch.norm(weights, p=float(norm), dim=-1, keepdim=True)
    logits = logits.reshape(-1, logits.shape[-1])
    return logits, indices.reshape(-1, indices.shape[-1]), weights.reshape(-1, weights.shape[-1])


def router_logits(output: Any, tokens: int | None = None) -> Any:
    """The logits in a router module's output: its first floating-point tensor of two or more dims
    (the expert scores; every router output protocol lists them before weights and indices)."""
    import torch

    items = output if isinstance(output, (tuple, list)) else (output,)
    for item in items:
        is_scores = isinstance(item, torch.Tensor) and item.is_floating_point() and item.dim() >= 2
        if is_scores and (tokens is None or item.numel() // item.shape[-1] == tokens):
            return item
    return None


def experts_indices(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The top-k indices an experts module is called with: its integer 2-D tensor argument."""
    import torch

    for value in (*args, *kwargs.values()):
        is_index = isinstance(value, torch.Tensor) and value.dim() == 2 and not value.is_floating_point()
        if is_index and value.dtype is not torch.bool:
            return value
    return None


def decoder_inputs(model: Any, input_ids: Any, mask: Any) -> dict[str, Any]:
    """Extra forward arguments of an encoder-decoder model: the decoder reads the same tokens (teacher
    forcing), so encoder and decoder layers are profiled on the same text."""
    if getattr(model.config, "is_encoder_decoder", False):
        return {"decoder_input_ids": input_ids, "decoder_attention_mask": mask}
    return {}


def capacity_info(spec: FamilySpec, config: Any) -> dict[str, Any] | None:
    """The expert capacity a capacity-limited model applies at eval, from its config (None otherwise)."""
    if spec.router_output is RouterOutput.SWITCH_MASK:
        return {"expert_capacity": getattr(config, "expert_capacity", None), "per": "sequence", "top_k": 1}
    if spec.router_output is RouterOutput.NLLB_MASK:
        fraction = getattr(config, "moe_eval_capacity_token_fraction", None)
        return {
            "expert_capacity": getattr(config, "expert_capacity", None),
            "eval_capacity_token_fraction": fraction,
            "per": "batch",
            "top_k": 2,
        }
    return None
