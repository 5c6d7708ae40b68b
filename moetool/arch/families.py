"""The model families moetool knows: one declarative entry each.

Adding a family is adding an entry here (and a tiny-model test); no other module branches on model
types. Tensor names are the ones on disk, as the family's Hub checkpoints and transformers'
``save_pretrained`` write them (per-expert 2-D tensors for most families; fused for gpt-oss, DBRX,
GraniteMoE and Llama-4).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from moetool.arch.spec import (
    ExpertLayout,
    ExpertsProtocol,
    FamilySpec,
    GroupRule,
    MergeTraits,
    RouterOutput,
    Routing,
    RoutingSpec,
    T,
    WindowRule,
)

# ----------------------------------------------------------------------------- shared building blocks

STANDARD_GLOBALS: dict[str, tuple[T, ...]] = {
    "embedding": (T("model.embed_tokens.weight", ("V", "H")),),
    "norms": (T("model.norm.weight", ("H",)),),
    "lm_head": (T("lm_head.weight", ("V", "H"), when="!tied"),),
}

LAYER_NORMS = (T("input_layernorm.weight", ("H",)), T("post_attention_layernorm.weight", ("H",)))


def gqa(
    *,
    qkv_bias: str | bool = False,
    o_bias: str | bool = False,
    qk_norm: tuple[str, str, str, str] | None = None,
    sinks: bool = False,
    q_factor: int = 1,
    prefix: str = "self_attn.",
) -> tuple[T, ...]:
    """Grouped-query attention templates.

    Args:
        qkv_bias / o_bias: ``True`` for always, a flag name for config-dependent, ``False`` for never.
        qk_norm: (q norm name, q norm size, k norm name, k norm size) when the family normalises q/k.
        sinks: gpt-oss's per-head attention sinks.
        q_factor: 2 when q_proj also produces an output gate (Qwen3-Next).
    """

    def bias(name: str, size: str, flag: str | bool) -> tuple[T, ...]:
        if flag is False:
            return ()
        return (T(f"{prefix}{name}.bias", (size,), when=None if flag is True else flag),)

    q_out = "NH*HD" if q_factor == 1 else f"{q_factor}*NH*HD"
    out: list[T] = [
        T(f"{prefix}q_proj.weight", (q_out, "H")),
        *bias("q_proj", q_out, qkv_bias),
        T(f"{prefix}k_proj.weight", ("NKV*HD", "H")),
        *bias("k_proj", "NKV*HD", qkv_bias),
        T(f"{prefix}v_proj.weight", ("NKV*HD", "H")),
        *bias("v_proj", "NKV*HD", qkv_bias),
        T(f"{prefix}o_proj.weight", ("H", "NH*HD")),
        *bias("o_proj", "H", o_bias),
    ]
    if qk_norm:
        q_name, q_size, k_name, k_size = qk_norm
        out += [T(f"{prefix}{q_name}.weight", (q_size,)), T(f"{prefix}{k_name}.weight", (k_size,))]
    if sinks:
        out.append(T(f"{prefix}sinks", ("NH",)))
    return tuple(out)


# DeepSeek multi-head latent attention; the low-rank query path exists only with q_lora_rank.
MLA = (
    T("self_attn.q_proj.weight", ("NH*QHD", "H"), when="!q_lora"),
    T("self_attn.q_a_proj.weight", ("QR", "H"), when="q_lora"),
    T("self_attn.q_a_proj.bias", ("QR",), when="q_lora_bias"),
    T("self_attn.q_a_layernorm.weight", ("QR",), when="q_lora"),
    T("self_attn.q_b_proj.weight", ("NH*QHD", "QR"), when="q_lora"),
    T("self_attn.kv_a_proj_with_mqa.weight", ("KVR+ROPE", "H")),
    T("self_attn.kv_a_proj_with_mqa.bias", ("KVR+ROPE",), when="attention_bias"),
    T("self_attn.kv_a_layernorm.weight", ("KVR",)),
    T("self_attn.kv_b_proj.weight", ("NH*KVBD", "KVR")),
    T("self_attn.o_proj.weight", ("H", "NH*VHD")),
    T("self_attn.o_proj.bias", ("H",), when="attention_bias"),
)


def swiglu(
    prefix: str,
    size: str,
    names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    bias_flag: str | None = None,
) -> tuple[T, ...]:
    """A gated MLP (gate, up, down), optionally with biases behind a flag."""
    gate, up, down = names
    out = [
        T(f"{prefix}{gate}.weight", (size, "H")),
        T(f"{prefix}{up}.weight", (size, "H")),
        T(f"{prefix}{down}.weight", ("H", size)),
    ]
    if bias_flag:
        out += [
            T(f"{prefix}{gate}.bias", (size,), when=bias_flag),
            T(f"{prefix}{up}.bias", (size,), when=bias_flag),
            T(f"{prefix}{down}.bias", ("H",), when=bias_flag),
        ]
    return tuple(out)


def per_expert(prefix: str, names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")) -> tuple[T, ...]:
    """Per-expert 2-D tensors: ``{prefix}experts.{E}.{proj}.weight``."""
    return swiglu(f"{prefix}experts.{{E}}.", "I", names)


def _hunyuan_layer(cfg: Mapping[str, Any], layer: int, values: dict[str, Any]) -> dict[str, Any]:
    """Hunyuan gives top-k, expert width and shared-expert count per layer (as lists or scalars)."""

    def pick(key: str, default: Any) -> Any:
        value = cfg.get(key, default)
        return value[layer] if isinstance(value, list) else value

    shared = pick("num_shared_expert", 1)
    return {
        "K": pick("moe_topk", 1),
        "I": pick("moe_intermediate_size", values["D"]),
        "S": values["D"] * (shared or 0),
        "has_shared": bool(shared),
    }


def _qwen3_next_layer(cfg: Mapping[str, Any], layer: int, values: dict[str, Any]) -> dict[str, Any]:
    """Qwen3-Next mixes gated-delta-net linear attention with gated full attention."""
    types = cfg.get("layer_types")
    if isinstance(types, list) and layer < len(types):
        full = types[layer] == "full_attention"
    else:
        interval = cfg.get("full_attention_interval", 4) or 4
        full = (layer + 1) % interval == 0
    return {
        "full_attention": full,
        "linear_attention": not full,
        "full_attention_bias": full and bool(values.get("attention_bias")),
    }


def _deepseek_derive(values: dict[str, Any]) -> dict[str, Any]:
    """MLA head sizes (query = nope + rope; k/v up-projection = nope + v) and shared-expert presence."""
    out: dict[str, Any] = {"has_shared": bool(values.get("NS"))}
    if "NOPE" in values and "ROPE" in values:
        out["QHD"] = values["NOPE"] + values["ROPE"]
    if "NOPE" in values and "VHD" in values:
        out["KVBD"] = values["NOPE"] + values["VHD"]
    return out


def _shared_if_any(values: dict[str, Any]) -> dict[str, Any]:
    return {"has_shared": bool(values.get("NS"))}


# ----------------------------------------------------------------------------- sliding windows


def _window_size(cfg: Mapping[str, Any]) -> int | None:
    size = cfg.get("sliding_window")
    # 0 is Qwen2-MoE's spelling of "no window"; bool is not a size.
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _windows_uniform(cfg: Mapping[str, Any], num_layers: int) -> list[int | None]:
    """Mistral, Mixtral (and Llama, which has no window): ``sliding_window`` applies to every layer."""
    return [_window_size(cfg)] * num_layers


def _windows_qwen_dense(cfg: Mapping[str, Any], num_layers: int) -> list[int | None]:
    """Qwen2 / Qwen3: a window only with ``use_sliding_window``, on the layers ``layer_types`` marks
    (default: from ``max_window_layers`` on)."""
    size = _window_size(cfg)
    if not cfg.get("use_sliding_window") or size is None:
        return [None] * num_layers
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == num_layers:
        return [size if kind == "sliding_attention" else None for kind in types]
    first = cfg.get("max_window_layers", 28)
    return [size if layer >= first else None for layer in range(num_layers)]


def _windows_qwen2_moe(cfg: Mapping[str, Any], num_layers: int) -> list[int | None]:
    """Qwen2-MoE: like Qwen2, but its default pattern is every other layer below ``max_window_layers``."""
    size = _window_size(cfg)
    if not cfg.get("use_sliding_window") or size is None:
        return [None] * num_layers
    types = cfg.get("layer_types")
    if isinstance(types, list) and len(types) == num_layers:
        return [size if kind == "sliding_attention" else None for kind in types]
    last = cfg.get("max_window_layers", 28)
    return [size if (layer + 1) % 2 and layer < last else None for layer in range(num_layers)]


def _windows_qwen3_moe(cfg: Mapping[str, Any], num_layers: int) -> list[int | None]:
    """Qwen3-MoE: ``use_sliding_window`` puts the window on every layer."""
    size = _window_size(cfg)
    return [size if cfg.get("use_sliding_window") else None] * num_layers


def _write_windows_uniform(windows: list[int | None]) -> dict[str, Any] | None:
    return {"sliding_window": windows[0]} if len(set(windows)) <= 1 and windows else None


def _write_windows_qwen3_moe(windows: list[int | None]) -> dict[str, Any] | None:
    if len(set(windows)) > 1 or not windows:
        return None
    return {"use_sliding_window": windows[0] is not None, "sliding_window": windows[0]}


def _write_windows_layer_types(windows: list[int | None]) -> dict[str, Any] | None:
    sizes = {w for w in windows if w is not None}
    if len(sizes) > 1:  # one window size for all sliding layers
        return None
    size = next(iter(sizes), None)
    return {
        "use_sliding_window": size is not None,
        "sliding_window": size,
        "max_window_layers": len(windows),
        "layer_types": ["sliding_attention" if w is not None else "full_attention" for w in windows],
    }


UNIFORM_WINDOWS = WindowRule(("sliding_window",), _windows_uniform, _write_windows_uniform)
QWEN_DENSE_WINDOWS = WindowRule(
    ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"), _windows_qwen_dense
)


# ----------------------------------------------------------------------------- the families

MLA_FIELDS = {
    "QR": ("q_lora_rank",),
    "KVR": ("kv_lora_rank",),
    "ROPE": ("qk_rope_head_dim",),
    "NOPE": ("qk_nope_head_dim",),
    "VHD": ("v_head_dim",),
}

# DeepSeek's shared experts form one MLP n_shared_experts times as wide as a routed expert.
SHARED_EXPERTS = tuple(T(t.name, t.shape, when="has_shared") for t in swiglu("mlp.shared_experts.", "NS*I"))

DEEPSEEK_FLAGS = {
    "attention_bias": ("attention_bias", False),
    "q_lora": lambda cfg: cfg.get("q_lora_rank") is not None,
    "q_lora_bias": lambda cfg: cfg.get("q_lora_rank") is not None and bool(cfg.get("attention_bias")),
}

FAMILIES: tuple[FamilySpec, ...] = (
    # ------------------------------------------------------------------ dense families
    FamilySpec(
        name="llama",
        model_types=("llama",),
        architectures=("LlamaForCausalLM",),
        is_moe=False,
        fields={},
        flags={"attention_bias": ("attention_bias", False), "mlp_bias": ("mlp_bias", False)},
        globals_=STANDARD_GLOBALS,
        attention=gqa(qkv_bias="attention_bias", o_bias="attention_bias"),
        norms=LAYER_NORMS,
        dense_mlp=swiglu("mlp.", "D", bias_flag="mlp_bias"),
        schedule="none",
        moe_counterpart="mixtral",
        upcycle_targets=("mixtral", "qwen2_moe"),
        windows=UNIFORM_WINDOWS,
    ),
    FamilySpec(
        name="mistral",
        model_types=("mistral",),
        architectures=("MistralForCausalLM",),
        is_moe=False,
        fields={},
        globals_=STANDARD_GLOBALS,
        attention=gqa(),
        norms=LAYER_NORMS,
        dense_mlp=swiglu("mlp.", "D"),
        schedule="none",
        moe_counterpart="mixtral",
        upcycle_targets=("mixtral", "qwen2_moe"),
        windows=UNIFORM_WINDOWS,
    ),
    FamilySpec(
        name="qwen2",
        model_types=("qwen2",),
        architectures=("Qwen2ForCausalLM",),
        is_moe=False,
        fields={},
        globals_=STANDARD_GLOBALS,
        attention=gqa(qkv_bias=True),
        norms=LAYER_NORMS,
        dense_mlp=swiglu("mlp.", "D"),
        schedule="none",
        moe_counterpart="qwen2_moe",
        upcycle_targets=("qwen2_moe",),
        windows=QWEN_DENSE_WINDOWS,
    ),
    FamilySpec(
        name="qwen3",
        model_types=("qwen3",),
        architectures=("Qwen3ForCausalLM",),
        is_moe=False,
        fields={},
        flags={"attention_bias": ("attention_bias", False)},
        globals_=STANDARD_GLOBALS,
        attention=gqa(qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=("q_norm", "HD", "k_norm", "HD")),
        norms=LAYER_NORMS,
        dense_mlp=swiglu("mlp.", "D"),
        schedule="none",
        moe_counterpart="qwen3_moe",
        upcycle_targets=("qwen3_moe",),
        windows=QWEN_DENSE_WINDOWS,
    ),
    # ------------------------------------------------------------------ MoE families
    FamilySpec(
        name="mixtral",
        model_types=("mixtral",),
        architectures=("MixtralForCausalLM",),
        is_moe=True,
        fields={"E": ("num_local_experts",), "I": ("intermediate_size",)},
        globals_=STANDARD_GLOBALS,
        attention=gqa(),
        norms=LAYER_NORMS,
        router=(T("block_sparse_moe.gate.weight", ("E", "H")),),
        routed_experts=per_expert("block_sparse_moe.", ("w1", "w3", "w2")),
        routing=RoutingSpec(Routing.SOFTMAX_TOPK),
        dense_counterpart="mistral",
        windows=UNIFORM_WINDOWS,
    ),
    FamilySpec(
        name="qwen2_moe",
        model_types=("qwen2_moe",),
        architectures=("Qwen2MoeForCausalLM",),
        is_moe=True,
        fields={"E": ("num_experts",)},
        flags={"qkv_bias": ("qkv_bias", True)},
        globals_=STANDARD_GLOBALS,
        attention=gqa(qkv_bias="qkv_bias"),
        norms=LAYER_NORMS,
        dense_mlp=swiglu("mlp.", "D"),
        router=(T("mlp.gate.weight", ("E", "H")),),
        routed_experts=per_expert("mlp."),
        shared_experts=(*swiglu("mlp.shared_expert.", "S"), T("mlp.shared_expert_gate.weight", (1, "H"))),
        schedule="qwen",
        routing=RoutingSpec(Routing.SOFTMAX_TOPK, "norm_topk_prob", False),
        dense_counterpart="qwen2",
        windows=WindowRule(
            ("use_sliding_window", "sliding_window", "max_window_layers", "layer_types"),
            _windows_qwen2_moe,
            _write_windows_layer_types,
        ),
        shared_expert_gate="mlp.shared_expert_gate.weight",
    ),
    FamilySpec(
        name="qwen3_moe",
        model_types=("qwen3_moe",),
        architectures=("Qwen3MoeForCausalLM",),
        is_moe=True,
        fields={"E": ("num_experts",)},
        flags={"attention_bias": ("attention_bias", False)},
        globals_=STANDARD_GLOBALS,
        attention=gqa(qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=("q_norm", "HD", "k_norm", "HD")),
        norms=LAYER_NORMS,
        dense_mlp=swiglu("mlp.", "D"),
        router=(T("mlp.gate.weight", ("E", "H")),),
        routed_experts=per_expert("mlp."),
        schedule="qwen",
        routing=RoutingSpec(Routing.SOFTMAX_TOPK, "norm_topk_prob", False),
        dense_counterpart="qwen3",
        windows=WindowRule(("use_sliding_window", "sliding_window"), _windows_qwen3_moe, _write_windows_qwen3_moe),
    ),
    FamilySpec(
        name="qwen3_next",
        model_types=("qwen3_next",),
        architectures=("Qwen3NextForCausalLM",),
        is_moe=True,
        fields={
            "E": ("num_experts",),
            "LKH": ("linear_num_key_heads",),
            "LVH": ("linear_num_value_heads",),
            "LKD": ("linear_key_head_dim",),
            "LVD": ("linear_value_head_dim",),
            "CONV": ("linear_conv_kernel_dim",),
        },
        flags={"attention_bias": ("attention_bias", False)},
        globals_=STANDARD_GLOBALS,
        attention=(
            *(
                T(t.name, t.shape, when="full_attention")
                for t in gqa(
                    qkv_bias="attention_bias",
                    o_bias="attention_bias",
                    qk_norm=("q_norm", "HD", "k_norm", "HD"),
                    q_factor=2,
                )
                if t.when is None
            ),
            T("self_attn.q_proj.bias", ("2*NH*HD",), when="full_attention_bias"),
            T("self_attn.k_proj.bias", ("NKV*HD",), when="full_attention_bias"),
            T("self_attn.v_proj.bias", ("NKV*HD",), when="full_attention_bias"),
            T("self_attn.o_proj.bias", ("H",), when="full_attention_bias"),
            T("linear_attn.in_proj_qkvz.weight", ("2*LKH*LKD+2*LVH*LVD", "H"), when="linear_attention"),
            T("linear_attn.in_proj_ba.weight", ("2*LVH", "H"), when="linear_attention"),
            T("linear_attn.conv1d.weight", ("2*LKH*LKD+LVH*LVD", 1, "CONV"), when="linear_attention"),
            T("linear_attn.dt_bias", ("LVH",), when="linear_attention"),
            T("linear_attn.A_log", ("LVH",), when="linear_attention"),
            T("linear_attn.norm.weight", ("LVD",), when="linear_attention"),
            T("linear_attn.out_proj.weight", ("H", "LVH*LVD"), when="linear_attention"),
        ),
        norms=LAYER_NORMS,
        dense_mlp=swiglu("mlp.", "D"),
        router=(T("mlp.gate.weight", ("E", "H")),),
        routed_experts=per_expert("mlp."),
        shared_experts=(*swiglu("mlp.shared_expert.", "S"), T("mlp.shared_expert_gate.weight", (1, "H"))),
        schedule="qwen",
        routing=RoutingSpec(Routing.SOFTMAX_TOPK, "norm_topk_prob", True),
        layer_dims=_qwen3_next_layer,
        # Hub checkpoints store the multi-token-prediction module as "mtp.*" (not built by transformers).
        mtp_prefixes=("mtp.",),
        shared_expert_gate="mlp.shared_expert_gate.weight",
    ),
    FamilySpec(
        name="deepseek_v2",
        model_types=("deepseek_v2",),
        architectures=("DeepseekV2ForCausalLM",),
        is_moe=True,
        merge=MergeTraits(groups=GroupRule(min_per_group=1)),
        fields={"E": ("n_routed_experts",), "NS": ("n_shared_experts",), **MLA_FIELDS},
        defaults={"NS": 0},
        flags={**DEEPSEEK_FLAGS, "mlp_bias": ("mlp_bias", False)},
        globals_=STANDARD_GLOBALS,
        attention=MLA,
        norms=LAYER_NORMS,
        dense_mlp=swiglu("mlp.", "D", bias_flag="mlp_bias"),
        router=(T("mlp.gate.weight", ("E", "H")),),
        routed_experts=per_expert("mlp."),
        shared_experts=SHARED_EXPERTS,
        schedule="deepseek",
        routing=RoutingSpec(Routing.SOFTMAX_TOPK, "norm_topk_prob", False, "routed_scaling_factor"),
        derive=_deepseek_derive,
    ),
    FamilySpec(
        name="deepseek_v3",
        model_types=("deepseek_v3", "kimi_k2"),
        architectures=("DeepseekV3ForCausalLM",),
        is_moe=True,
        merge=MergeTraits(groups=GroupRule(min_per_group=2)),
        fields={"E": ("n_routed_experts",), "NS": ("n_shared_experts",), **MLA_FIELDS},
        defaults={"NS": 0},
        flags=DEEPSEEK_FLAGS,
        globals_=STANDARD_GLOBALS,
        attention=MLA,
        norms=LAYER_NORMS,
        dense_mlp=swiglu("mlp.", "D"),
        router=(T("mlp.gate.weight", ("E", "H")), T("mlp.gate.e_score_correction_bias", ("E",))),
        routed_experts=per_expert("mlp."),
        shared_experts=SHARED_EXPERTS,
        derive=_deepseek_derive,
        # The multi-token-prediction module stored after the last decoder layer (not run by
        # transformers): a full decoder layer plus these projections and its own embedding/head.
        mtp=(
            T("embed_tokens.weight", ("V", "H")),
            T("enorm.weight", ("H",)),
            T("hnorm.weight", ("H",)),
            T("eh_proj.weight", ("H", "2*H")),
            T("shared_head.norm.weight", ("H",)),
            T("shared_head.head.weight", ("V", "H")),
        ),
        schedule="deepseek",
        routing=RoutingSpec(Routing.SIGMOID_GROUPED_TOPK, "norm_topk_prob", True, "routed_scaling_factor"),
    ),
    FamilySpec(
        # DeepSeekMoE 16B (remote code "deepseek"): MHA attention, fine-grained + shared experts.
        name="deepseek_moe",
        model_types=("deepseek",),
        architectures=("DeepseekForCausalLM",),
        is_moe=True,
        capabilities={
            "merge": "DeepSeekMoE 16B needs its own Python code (no transformers class), so its output could not "
            "be loaded or checked"
        },
        fields={"E": ("n_routed_experts",), "NS": ("n_shared_experts",)},
        defaults={"NS": 0},
        flags={"attention_bias": ("attention_bias", False)},
        globals_=STANDARD_GLOBALS,
        attention=gqa(qkv_bias="attention_bias", o_bias="attention_bias"),
        norms=LAYER_NORMS,
        dense_mlp=swiglu("mlp.", "D"),
        router=(T("mlp.gate.weight", ("E", "H")),),
        routed_experts=per_expert("mlp."),
        shared_experts=SHARED_EXPERTS,
        schedule="deepseek",
        routing=RoutingSpec(Routing.SOFTMAX_TOPK, "norm_topk_prob", False),
        derive=_shared_if_any,
    ),
    FamilySpec(
        name="olmoe",
        model_types=("olmoe",),
        architectures=("OlmoeForCausalLM",),
        is_moe=True,
        fields={"E": ("num_experts",), "I": ("intermediate_size",)},
        flags={"attention_bias": ("attention_bias", False)},
        globals_=STANDARD_GLOBALS,
        attention=gqa(qkv_bias="attention_bias", o_bias="attention_bias", qk_norm=("q_norm", "H", "k_norm", "NKV*HD")),
        norms=LAYER_NORMS,
        router=(T("mlp.gate.weight", ("E", "H")),),
        routed_experts=per_expert("mlp."),
        routing=RoutingSpec(Routing.SOFTMAX_TOPK, "norm_topk_prob", False),
    ),
    FamilySpec(
        name="dbrx",
        model_types=("dbrx",),
        architectures=("DbrxForCausalLM",),
        is_moe=True,
        merge=MergeTraits(act_keys=("ffn_config.ffn_act_fn.name",)),
        fields={
            "L": ("n_layers",),
            "H": ("d_model",),
            "NH": ("n_heads",),
            "NKV": ("attn_config.kv_n_heads",),
            "E": ("ffn_config.moe_num_experts",),
            "K": ("ffn_config.moe_top_k",),
            "I": ("ffn_config.ffn_hidden_size",),
        },
        defaults={"E": 4, "K": 1},
        globals_={
            "embedding": (T("transformer.wte.weight", ("V", "H")),),
            "norms": (T("transformer.norm_f.weight", ("H",)),),
            "lm_head": (T("lm_head.weight", ("V", "H"), when="!tied"),),
        },
        layer_prefix="transformer.blocks.{L}.",
        attention=(
            T("norm_attn_norm.attn.Wqkv.weight", ("H+2*NKV*HD", "H")),
            T("norm_attn_norm.attn.out_proj.weight", ("H", "H")),
        ),
        norms=(T("norm_attn_norm.norm_1.weight", ("H",)), T("norm_attn_norm.norm_2.weight", ("H",))),
        router=(T("ffn.router.layer.weight", ("E", "H")),),
        routed_experts=(
            T("ffn.experts.mlp.w1", ("E*I", "H")),
            T("ffn.experts.mlp.v1", ("E*I", "H")),
            T("ffn.experts.mlp.w2", ("E*I", "H")),
        ),
        expert_layout=ExpertLayout.FUSED,
        routing=RoutingSpec(Routing.SOFTMAX_TOPK, "ffn_config.moe_normalize_expert_weights", True),
        router_module="ffn.router",
        router_output=RouterOutput.LOGITS,
        experts_module="ffn.experts",
        experts_protocol=ExpertsProtocol.OTHER,  # w1/v1/w2 as [E*I, H]
    ),
    FamilySpec(
        name="gpt_oss",
        model_types=("gpt_oss",),
        architectures=("GptOssForCausalLM",),
        is_moe=True,
        capabilities={
            "merge": "gpt-oss experts use a clamped SwiGLU with biases and interleaved gate/up columns, and are "
            "usually stored as MXFP4; averaging them is not supported"
        },
        fields={
            "E": ("num_local_experts",),
            "K": ("num_experts_per_tok", "experts_per_token"),
            "I": ("intermediate_size",),
        },
        flags={"attention_bias": ("attention_bias", True)},
        globals_=STANDARD_GLOBALS,
        attention=gqa(qkv_bias="attention_bias", o_bias="attention_bias", sinks=True),
        norms=LAYER_NORMS,
        router=(T("mlp.router.weight", ("E", "H")), T("mlp.router.bias", ("E",))),
        routed_experts=(
            T("mlp.experts.gate_up_proj", ("E", "H", "2*I")),
            T("mlp.experts.gate_up_proj_bias", ("E", "2*I")),
            T("mlp.experts.down_proj", ("E", "I", "H")),
            T("mlp.experts.down_proj_bias", ("E", "H")),
        ),
        expert_layout=ExpertLayout.FUSED,
        routing=RoutingSpec(Routing.TOPK_SOFTMAX),
        router_module="mlp.router",
        experts_protocol=ExpertsProtocol.OTHER,  # transposed, biased, interleaved gate/up
    ),
    FamilySpec(
        name="granitemoe",
        model_types=("granitemoe",),
        architectures=("GraniteMoeForCausalLM",),
        is_moe=True,
        fields={"E": ("num_local_experts",), "I": ("intermediate_size",)},
        flags={"attention_bias": ("attention_bias", False)},
        globals_=STANDARD_GLOBALS,
        attention=gqa(qkv_bias="attention_bias", o_bias="attention_bias"),
        norms=LAYER_NORMS,
        router=(T("block_sparse_moe.router.layer.weight", ("E", "H")),),
        routed_experts=(
            T("block_sparse_moe.input_linear.weight", ("E", "2*I", "H")),
            T("block_sparse_moe.output_linear.weight", ("E", "H", "I")),
        ),
        expert_layout=ExpertLayout.FUSED,
        routing=RoutingSpec(Routing.TOPK_SOFTMAX),
        router_module="block_sparse_moe.router",
        experts_module="block_sparse_moe.experts",
    ),
    FamilySpec(
        name="llama4",
        model_types=("llama4", "llama4_text"),
        architectures=("Llama4ForConditionalGeneration", "Llama4ForCausalLM"),
        is_moe=True,
        merge=MergeTraits(router_scales_input=True),
        fields={"E": ("num_local_experts",), "I": ("intermediate_size",), "D": ("intermediate_size_mlp",)},
        flags={"attention_bias": ("attention_bias", False)},
        globals_=STANDARD_GLOBALS,
        attention=gqa(qkv_bias="attention_bias", o_bias="attention_bias", prefix="self_attn."),
        norms=LAYER_NORMS,
        dense_mlp=swiglu("feed_forward.", "D"),
        router=(T("feed_forward.router.weight", ("E", "H")),),
        routed_experts=(
            T("feed_forward.experts.gate_up_proj", ("E", "H", "2*I")),
            T("feed_forward.experts.down_proj", ("E", "I", "H")),
        ),
        shared_experts=swiglu("feed_forward.shared_expert.", "I"),
        expert_layout=ExpertLayout.FUSED,
        schedule="llama4",
        routing=RoutingSpec(Routing.TOPK_SIGMOID),
        router_module="feed_forward.router",
        router_output=RouterOutput.SCORES_LOGITS,
        experts_module="feed_forward.experts",
        experts_protocol=ExpertsProtocol.OTHER,  # [E, H, 2I], every token through every expert
        text_config_key="text_config",
        name_prefixes=("language_model.",),
    ),
    FamilySpec(
        name="hunyuan_moe",
        model_types=("hunyuan_v1_moe", "hunyuan"),
        architectures=("HunYuanMoEV1ForCausalLM",),
        is_moe=True,
        fields={
            "E": ("num_experts",),
            "K": ("moe_topk", "num_experts_per_tok"),
            "I": ("moe_intermediate_size", "intermediate_size"),
            "HD": ("head_dim", "attention_head_dim"),
        },
        flags={"attention_bias": ("attention_bias", False)},
        globals_=STANDARD_GLOBALS,
        attention=gqa(
            qkv_bias="attention_bias",
            o_bias="attention_bias",
            qk_norm=("query_layernorm", "HD", "key_layernorm", "HD"),
        ),
        norms=LAYER_NORMS,
        router=(T("mlp.gate.wg.weight", ("E", "H")),),
        routed_experts=per_expert("mlp."),
        shared_experts=tuple(T(t.name, t.shape, when="has_shared") for t in swiglu("mlp.shared_mlp.", "S")),
        routing=RoutingSpec(Routing.SOFTMAX_TOPK),
        layer_dims=_hunyuan_layer,
    ),
    FamilySpec(
        name="minimax_m2",
        model_types=("minimax_m2",),
        architectures=("MiniMaxM2ForCausalLM",),
        is_moe=True,
        fields={"E": ("num_local_experts",), "I": ("intermediate_size",)},
        globals_=STANDARD_GLOBALS,
        attention=gqa(qk_norm=("q_norm", "NH*HD", "k_norm", "NKV*HD")),
        norms=LAYER_NORMS,
        router=(
            T("block_sparse_moe.gate.weight", ("E", "H")),
            T("block_sparse_moe.e_score_correction_bias", ("E",)),
        ),
        routed_experts=per_expert("block_sparse_moe.", ("w1", "w3", "w2")),
        routing=RoutingSpec(Routing.SIGMOID_GROUPED_TOPK),
    ),
)
