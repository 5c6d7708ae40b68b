"""Families derived from the installed transformers: the generated table, read without torch.

``moetool/arch/data/derived_families.json`` is written by ``python -m moetool.arch.derive`` (see
:mod:`moetool.arch.derive` and docs/ARCHITECTURE-families.md): for every MoE model type of the
transformers version the project installs that no hand-written entry of
:mod:`moetool.arch.families` covers, the tensors ``save_pretrained`` writes, as templates whose shapes
are expressions over config fields and whose presence is a layer condition; plus what the generator
checked and the reason for every model type it could not describe. This module turns the table's
entries into :class:`moetool.arch.spec.FamilySpec` objects, so every command uses one registry API.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from pathlib import Path
from typing import Any

from moetool.arch.experts import roles_by_stack, roles_of
from moetool.arch.spec import ExpertLayout, ExpertsProtocol, FamilySpec, RouterOutput, Routing, RoutingSpec, Stack, T
from moetool.errors import UnsupportedArchitectureError

TABLE = Path(__file__).parent / "data" / "derived_families.json"

#: Per-layer categories and the FamilySpec field that holds them.
_LAYER_FIELDS = {
    "attention": "attention",
    "norms": "norms",
    "dense_mlp": "dense_mlp",
    "router": "router",
    "routed_experts": "routed_experts",
    "shared_experts": "shared_experts",
    "other": "layer_other",
}


@lru_cache(maxsize=1)
def load_table(path: Path = TABLE) -> dict[str, Any]:
    """The generated table (``{"transformers": version, "families": [...], "refused": {...}}``)."""
    if not path.exists():
        return {"transformers": None, "families": [], "refused": {}}
    return json.loads(path.read_text(encoding="utf-8"))


def _when(condition: str | None) -> str | None:
    if condition in (None, "", "all"):
        return None
    if condition in ("!tied", "tied"):
        return condition
    return "c:" + condition


def _template(entry: list[Any]) -> T:
    name, shape, _category, condition, *rest = entry
    return T(name, tuple(shape), when=_when(condition), stack=rest[0] if rest else 0)


def _quantizable_experts(templates: list[T]) -> bool:
    """Whether a layer's routed experts are what ``moetool quantize`` rewrites: bias-free gate, up and down
    projections per expert, stored in canonical orientation (see :mod:`moetool.arch.experts`)."""
    try:
        roles = roles_of(templates)
    except UnsupportedArchitectureError:
        return False
    return roles.gated and not roles.fused and not roles.has_bias and roles.plain


def _linear_experts(templates: list[T]) -> bool:
    """Whether each stack's routed experts are two-matrix MLPs stored per expert in canonical orientation
    (Switch Transformers' ``wi``/``wo``, NLLB-MoE's ``fc1``/``fc2`` with biases): ``nn.Linear`` modules
    in memory, which quantize rewrites one linear map at a time (:mod:`moetool.quantize.linear_experts`)."""
    if not templates:
        return False
    try:
        stacks = roles_by_stack(templates)
    except UnsupportedArchitectureError:
        return False
    return not any(roles.gated or roles.fused or not roles.plain for roles in stacks)


def family_from_entry(entry: Mapping[str, Any]) -> FamilySpec:
    """A :class:`FamilySpec` from one generated entry."""
    layers: dict[str, list[T]] = {field: [] for field in _LAYER_FIELDS.values()}
    for item in entry["layers"]:
        category = item[2]
        field = _LAYER_FIELDS.get(category, "layer_other")
        layers[field].append(_template(item))
    globals_: dict[str, list[T]] = {}
    for item in entry["globals"]:
        globals_.setdefault(item[2], []).append(_template(item))
    conditions = sorted(
        {c for item in entry["layers"] + entry["globals"] if (c := item[3]) not in (None, "", "all", "!tied", "tied")}
    )
    global_conditions = frozenset(item[3] for item in entry["globals"] if item[3] in conditions)
    routing = entry.get("routing") or {}
    stacks = tuple(Stack(*item) for item in entry.get("stacks") or ())
    return FamilySpec(
        name=entry["model_type"],
        model_types=(entry["model_type"],),
        architectures=tuple(entry.get("architectures") or ()),
        is_moe=True,
        fields={symbol: tuple(keys) for symbol, keys in entry["fields"].items()},
        defaults=dict(entry.get("defaults") or {}),
        default_exprs=dict(entry.get("default_exprs") or {}),
        globals_={category: tuple(ts) for category, ts in globals_.items()},
        layer_prefix=entry["layer_prefix"],
        text_config_key=entry.get("text_config_key"),
        schedule=entry.get("schedule") or "all",
        routing=RoutingSpec(Routing(routing.get("rule", "softmax_topk"))),
        router_module=routing.get("router_module") or "mlp.gate",
        router_output=RouterOutput(routing.get("output", "experts_input")),
        experts_module=routing.get("experts_module") or "mlp.experts",
        layers_module=routing.get("layers_module"),
        experts_protocol=ExpertsProtocol(routing.get("experts_protocol", "other")),
        expert_layout=ExpertLayout(entry.get("expert_layout", "per_expert")),
        derived=True,
        conditions=tuple(conditions),
        global_conditions=global_conditions,
        mtp_fields=tuple(entry.get("mtp_fields") or ()),
        mtp_prefixes=tuple(entry.get("mtp_prefixes") or ()),
        model_class=entry.get("model_class"),
        stacks=stacks,
        tie_from_root=bool(entry.get("tie_from_root")),
        capabilities=_capabilities(entry, layers.get("routed_experts", [])),
        **{field: tuple(ts) for field, ts in layers.items()},
    )


#: Derived families whose experts quantize could name but whose output was seen to fail (tiny random
#: checkpoints of transformers 5.25, every family quantized and verified once): the reason quantize gives.
QUANTIZE_REFUSED = {
    "bailing_hybrid": "stock transformers 5.25 cannot convert its compressed-tensors experts on load",
    "kimi_linear": "stock transformers 5.25 cannot convert its compressed-tensors experts on load",
}
_CLAMPED_SWIGLU = (
    "its experts compute a clamped SwiGLU (swiglu_limit, swiglu_alpha, up + 1), which merge's expert "
    "math does not model (the experts' outputs were seen to differ)"
)
#: Derived families whose experts merge reads but whose merged output was seen to fail (tiny random
#: checkpoints of transformers 5.25, every family merged and loaded once): the reason merge gives.
MERGE_REFUSED = {
    "deepseek_v4": "its hash-routed layers send tokens to experts by a fixed table (tid2eid) instead of a learned "
    "router, and merge reduces router rows",
    "minimax_m3_vl": _CLAMPED_SWIGLU,
    "minimax_m3_vl_text": _CLAMPED_SWIGLU,
    "nemo_speechlm": "stock transformers 5.25 cannot reload its own saved checkpoint (its audio tower's attention "
    "shapes change on load), so a merged output could not be checked",
}
_WRAPPER_REFUSAL = (
    "a multimodal wrapper (the MoE sits in text_config): quantize writes and verifies text models only; "
    "quantize the text model's checkpoint"
)


def _capabilities(entry: Mapping[str, Any], routed: list[T]) -> dict[str, str]:
    """The table's per-command refusals, less quantize where the experts are per-expert gate/up/down
    projections of a text model (quantize then checks the in-memory experts module itself), or per-expert
    two-matrix MLPs of an encoder-decoder (quantized as linear maps); quantize verifies its output through
    stock transformers (tests/test_derived_families.py quantizes each of them)."""
    capabilities = dict(entry.get("capabilities") or {})
    model_type = entry["model_type"]
    if entry.get("expert_layout", "per_expert") == "per_expert" and _quantizable_experts(routed):
        if model_type in QUANTIZE_REFUSED:
            capabilities["quantize"] = QUANTIZE_REFUSED[model_type]
        elif entry.get("text_config_key"):
            capabilities["quantize"] = _WRAPPER_REFUSAL
        else:
            capabilities.pop("quantize", None)
    elif entry.get("stacks") and entry.get("expert_layout", "per_expert") == "per_expert" and _linear_experts(routed):
        # Encoder-decoders with per-expert two-matrix experts: quantized as per-expert linear maps.
        capabilities.pop("quantize", None)
    # merge: a separate rule (see _merge_refusal), the precise reason where it refuses.
    merge_refusal = MERGE_REFUSED.get(model_type) or _merge_refusal(entry, routed)
    if merge_refusal is None:
        capabilities.pop("merge", None)
    else:
        capabilities["merge"] = merge_refusal
    distill = _distill_refusal(entry)
    if distill is None:
        capabilities.pop("distill", None)
    else:
        capabilities["distill"] = distill
    capabilities["upcycle"] = _UPCYCLE_REFUSAL
    return capabilities


_PADDED_VOCABULARY = (
    "its embedding holds more rows (vocab_size, padded) than its head predicts, so no dense student of a "
    "stock architecture shares both its vocabulary and its logits"
)
#: Why distill refuses a derived family as the teacher, where it does.
DISTILL_REFUSED = {
    "inkling2": _PADDED_VOCABULARY,
    "inkling2_text": _PADDED_VOCABULARY,
    "nemo_speechlm": "stock transformers 5.25 does not reload a checkpoint of it that it saved (its audio tower's "
    "diarization sub-config comes back with other shapes), so the teacher cannot be loaded",
}
_UPCYCLE_REFUSAL = (
    "upcycle writes the MoE counterparts of the dense families in the hand-written registry (--arch mixtral, "
    "qwen2_moe, qwen3_moe); no dense family's config and tensors are mapped onto this one"
)


def _distill_refusal(entry: Mapping[str, Any]) -> str | None:
    """Distill runs the teacher through the layer-streamed runner (any family profile-routing runs) and
    trains a dense student given by ``--init PATH`` (students built from the teacher need the registry's
    dense counterpart, which derived families lack: distill refuses those inits itself). An encoder-decoder
    teacher is refused: the student is a decoder-only language model (tests/test_derived_families.py
    distills each family once)."""
    if entry["model_type"] in DISTILL_REFUSED:
        return DISTILL_REFUSED[entry["model_type"]]
    if entry.get("stacks"):
        return "an encoder-decoder teacher: distill trains a decoder-only student on next-token logits"
    return None


def _merge_refusal(entry: Mapping[str, Any], routed: list[T]) -> str | None:
    """Why merge cannot rewrite this family, or ``None``: each stack's routed experts must be gated or
    two-matrix MLPs merge reads (:class:`moetool.merge.layout.LayerTensors`), and the router one row per
    routed expert. tests/test_derived_families.py merges each family that passes and loads the output
    with stock transformers; :data:`MERGE_REFUSED` holds the ones seen to fail."""
    if not routed:
        return "no routed-expert tensors"
    try:
        stacks = roles_by_stack(routed, family=entry["model_type"])
    except UnsupportedArchitectureError as exc:
        return exc.message
    if any(r.role == "gate_up" and r.bias is not None for roles in stacks for r in roles.roles):
        return "its fused gate/up projection has a bias; merge reads biases of separate projections only"
    for item in entry["layers"]:
        shape = tuple(str(term).replace(" ", "") for term in item[1])
        if item[2] == "router" and any("E" in term for term in shape) and shape not in (("E", "H"), ("E",)):
            return (
                f"its router tensor {item[0]} is {list(shape)}, not one row per routed expert (extra rows for "
                "shared or zero-compute experts, or a [1, E] bias): merge reduces one row per expert"
            )
    return None


def derived_families() -> list[FamilySpec]:
    """Every family of the generated table."""
    return [family_from_entry(entry) for entry in load_table()["families"]]


def refused_model_types() -> dict[str, str]:
    """MoE model types of the installed transformers that moetool does not support, with the reason."""
    return dict(load_table().get("refused") or {})
