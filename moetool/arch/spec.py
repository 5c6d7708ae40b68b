"""The declarative description of a model family (the vocabulary of the registry).

A family is described by *tensor templates*: the on-disk names of its tensors relative to the model
(``model.embed_tokens.weight``) or to a decoder layer (``block_sparse_moe.experts.{E}.w1.weight``), each
with a symbolic shape (``("I", "H")``) and the parameter category it belongs to. The same templates
serve every command:

* ``inspect`` classifies the tensors of a checkpoint by matching them (header path) and predicts the
  tensors a config implies by instantiating them (config path);
* upcycle, merge and quantize know where routers, experts and shared experts live, and which layout
  (per expert or fused 3-D) the family writes.

Symbols in shapes are resolved by :func:`moetool.arch.dims.resolve_dims` from config.json: ``H`` hidden
size, ``V`` vocabulary, ``NH``/``NKV`` attention/key-value heads, ``HD`` head dim, ``E`` routed experts,
``K`` top-k, ``I`` routed-expert intermediate size, ``D`` dense-MLP intermediate size, ``S`` shared-expert
intermediate size, plus family-specific ones (MLA ranks, linear-attention sizes). A shape entry is a
symbol, an int, or a product such as ``"2*I"``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

# Parameter categories, in display order. These names are part of the --json schema.
CATEGORIES: tuple[str, ...] = (
    "embedding",
    "lm_head",
    "attention",
    "router",
    "routed_experts",
    "shared_experts",
    "dense_mlp",
    "norms",
    "mtp",
    "vision",
    "audio",
    "other",
)

#: Tensors that hold expert indices rather than weights: hash-routing tables (DeepSeek-V4's ``tid2eid``,
#: token id -> the experts it goes to). transformers stores them as integers; they are never quantized
#: storage, and commands copy them unchanged.
INDEX_TABLE_LEAVES = frozenset({"tid2eid"})


def is_index_table(name: str) -> bool:
    """Whether a tensor name is an expert-index table (:data:`INDEX_TABLE_LEAVES`)."""
    return name.rsplit(".", 1)[-1] in INDEX_TABLE_LEAVES


class Routing(str, Enum):
    """How a family turns router logits into expert choices (GUIDE.md section 3)."""

    SOFTMAX_TOPK = "softmax_topk"  # softmax over all experts, top-k, renormalise if norm_topk_prob
    SIGMOID_GROUPED_TOPK = "sigmoid_grouped_topk"  # DeepSeek-V3: sigmoid + correction bias + groups
    TOPK_SOFTMAX = "topk_softmax"  # top-k of logits, softmax over the k (gpt-oss, GraniteMoE)
    TOPK_SIGMOID = "topk_sigmoid"  # top-k of logits, sigmoid of the chosen logits (Llama-4)
    NONE = "none"  # dense family


class RouterOutput(str, Enum):
    """What a family's in-memory router module returns (transformers v5), so hooks can read choices."""

    LOGITS_WEIGHTS_INDICES = "logits_weights_indices"  # (router_logits, top_k_weights, top_k_index)
    SCORES_LOGITS = "scores_logits"  # Llama-4: (masked sigmoid scores [T, E], router_logits)
    LOGITS = "logits"  # DBRX: logits only; the MoE block applies the routing rule
    # The choices are read where the model uses them: the top-k indices the experts module receives
    # (``experts(hidden_states, top_k_index, top_k_weights)``); the router module gives the logits.
    EXPERTS_INPUT = "experts_input"
    # Switch Transformers: (router_mask [T, E] one-hot after the capacity drop, router_probs, logits).
    SWITCH_MASK = "switch_mask"
    # NLLB-MoE: (top_1_mask or dispatch mask [T, E] after capacity, router_probs); logits recomputed.
    NLLB_MASK = "nllb_mask"

    @property
    def capacity_limited(self) -> bool:
        """The router drops choices beyond an expert capacity (Switch Transformers, NLLB-MoE)."""
        return self in (RouterOutput.SWITCH_MASK, RouterOutput.NLLB_MASK)


class ExpertsProtocol(str, Enum):
    """What a family's in-memory routed-experts module (transformers v5) looks like, for commands that
    replace or rewrite it (quantize)."""

    # 3-D gate_up_proj [E, 2I, H] (gate rows first) and down_proj [E, H, I], no biases, act_fn(gate) * up,
    # called as experts(hidden_states [T, H], top_k_index [T, K], top_k_weights [T, K]).
    GATE_UP_DOWN = "gate_up_down"
    OTHER = "other"  # a layout of its own (transposed, biased, interleaved or split): not handled yet


class ExpertLayout(str, Enum):
    """How routed experts are stored on disk."""

    PER_EXPERT = "per_expert"  # one 2-D tensor per expert and projection
    FUSED = "fused"  # one tensor per projection with the experts stacked (3-D, or [E*I, H] for DBRX)


@dataclass(frozen=True)
class T:
    """A tensor template.

    Args:
        name: the name relative to the model (global) or to a layer; ``{E}`` stands for the expert
            index and ``{M}`` for the MTP module index.
        shape: symbolic shape.
        when: the name of a boolean in the resolved dims; the tensor exists only when it is true
            (for example ``"attention_bias"``), or when it is false if prefixed with ``!``.
        stack: for encoder-decoder families, the index of the stack (:class:`Stack`) the per-layer
            template belongs to.
    """

    name: str
    shape: tuple[str | int, ...]
    when: str | None = None
    stack: int = 0


@dataclass(frozen=True)
class Stack:
    """One layer stack of an encoder-decoder family (the encoder, then the decoder).

    Attributes:
        prefix: the on-disk prefix of a layer, ``{L}`` the index within the stack (``encoder.block.{L}.``).
        count: the symbol of the stack's layer count.
        schedule: the layer condition (:mod:`moetool.arch.layers`) of the stack's MoE layers.
        layers_module: the in-memory path of the stack's layer list (``encoder.block``).
        router_module / experts_module: the router and experts modules inside one of its layers.
    """

    prefix: str
    count: str
    schedule: str
    layers_module: str
    router_module: str
    experts_module: str


@dataclass(frozen=True)
class RoutingSpec:
    """The routing rule and the config fields that parametrise it."""

    rule: Routing
    renormalize_key: str | None = None  # config key of the "renormalise top-k weights" flag
    renormalize_default: bool = True
    scaling_key: str | None = None  # routed_scaling_factor and friends


@dataclass(frozen=True)
class WindowRule:
    """How a family's config says which layers attend through a sliding window, and how wide it is.

    Args:
        keys: the config keys that carry it (removed from a config that changes family).
        read: ``(config, num_layers) -> [window or None per layer]``, with the family's own semantics.
        write: the inverse: config keys for a per-layer window list, or ``None`` when the family cannot
            express that pattern (Mixtral has one window for every layer). ``None`` for families that
            moetool never writes.
    """

    keys: tuple[str, ...]
    read: Callable[[Mapping[str, Any], int], list[int | None]]
    write: Callable[[list[int | None]], dict[str, Any] | None] | None = None


@dataclass(frozen=True)
class GroupRule:
    """Group-limited routing (DeepSeek): experts split into ``n_group`` contiguous groups.

    Attributes:
        n_group_key / topk_group_key: the config keys.
        min_per_group: the fewest experts a group may hold; DeepSeek-V3 scores a group by its two best
            experts (``topk(2)``), so its groups need at least two.
    """

    n_group_key: str = "n_group"
    topk_group_key: str = "topk_group"
    min_per_group: int = 1


@dataclass(frozen=True)
class MergeTraits:
    """What a command rewriting the experts (merge) needs to know about a family beyond its templates.

    Attributes:
        act_keys: config keys (dotted) holding the experts' activation name, first present wins
            (``silu`` when none is present, as transformers does).
        router_scales_input: the router weight multiplies the expert's input (Llama-4) rather than
            its output; an expert's contribution is then ``E(w x)``, not ``w E(x)``.
        groups: group-limited routing, when the family has it.
        extra_expert_keys: config keys that also hold the routed expert count (besides the
            registry's ``E`` fields and their aliases).
        capacity_keys: config keys holding a capacity-limited router's tokens per expert, scaled by
            ``N / M`` when the experts are reduced so the capacity factor stays the same.

    A family merge cannot handle says so in ``FamilySpec.capabilities["merge"]``, as for every command.
    """

    #: The activation keys transformers' configs use (Nemotron-H's ``mlp_hidden_act`` beside its Mamba's,
    #: Switch's ``dense_act_fn``, NLLB's ``activation_function``, Gemma's ``hidden_activation``), first
    #: present wins.
    act_keys: tuple[str, ...] = (
        "mlp_hidden_act",
        "hidden_act",
        "hidden_activation",
        "dense_act_fn",
        "activation_function",
    )
    router_scales_input: bool = False
    groups: GroupRule | None = None
    extra_expert_keys: tuple[str, ...] = ()
    capacity_keys: tuple[str, ...] = ("expert_capacity",)


@dataclass(frozen=True)
class FamilySpec:
    """Everything moetool knows about one model family.

    Attributes:
        name: registry key, e.g. ``"mixtral"``.
        model_types: ``config.json`` ``model_type`` values that select this family.
        architectures: ``config.json`` ``architectures`` class names that select it.
        is_moe: whether the family routes tokens to experts.
        fields: config keys per dim symbol, first present wins; dotted keys reach into nested
            objects (``"ffn_config.moe_num_experts"``).
        defaults: values for symbols that a config may omit.
        flags: boolean dims used by ``T.when``: config key and default, or a function of the config.
        layer_prefix: how a decoder layer's tensors start; ``{L}`` is the layer index.
        globals_: tensors outside the decoder layers, by category.
        attention / norms / dense_mlp / router / routed_experts / shared_experts: per-layer
            templates (relative to the layer prefix).
        mtp: per-MTP-module templates besides a full decoder layer (DeepSeek-V3).
        expert_layout: how routed experts are stored on disk.
        schedule: which layers are MoE: ``"all"``, ``"none"``, ``"qwen"`` (``mlp_only_layers`` and
            ``decoder_sparse_step``), ``"deepseek"`` (``first_k_dense_replace`` and
            ``moe_layer_freq``) or ``"llama4"`` (``moe_layers`` or ``interleave_moe_layer_step``).
        routing: the routing rule.
        text_config_key: the nested text config of multimodal wrappers (Llama-4).
        name_prefixes: wrapper prefixes stripped from tensor names before matching.
        dense_counterpart / moe_counterpart: the family merge --to-dense or upcycle writes.
        layer_dims: per-layer overrides of dims (hybrid or per-layer-list configs).
        derive: symbols computed from others (MLA head sizes, "has shared experts").
        router_module: the router's module name inside a decoder layer of the *instantiated*
            transformers model (v5 renames some on-disk prefixes, e.g. Mixtral's block_sparse_moe).
        router_output: what that module's forward returns.
        upcycle_targets: dense families only: the MoE families ``upcycle`` may write, the default first.
        windows: the family's sliding-window convention (``None``: full attention only).
        shared_expert_gate: the per-layer template name of a ``[1, H]`` gate whose sigmoid scales the
            shared expert's output (Qwen2-MoE), ``None`` when shared experts are ungated or absent.
        experts_module: the routed-experts module's name inside a decoder layer of the *instantiated*
            transformers model.
        experts_protocol: the shape and calling convention of that module (see :class:`ExpertsProtocol`).
        derived: the entry comes from the generated table (:mod:`moetool.arch.derived`): symbols are
            only those in ``fields``, and every per-layer template carries its own condition.
        default_exprs: symbols transformers computes from others when config.json omits them
            (``head_dim`` from ``hidden_size`` and the head count), as :func:`moetool.arch.dims.eval_dim`
            expressions.
        conditions: the layer conditions (:mod:`moetool.arch.layers`) templates refer to as
            ``when="c:<condition>"``; ``global_conditions`` are those evaluated once (config flags).
        mtp_fields: config keys giving the number of multi-token-prediction modules.
        mtp_prefixes: name prefixes of MTP tensors stored outside the decoder layers (``mtp.``).
        model_class: the transformers class a checkpoint loads as (derived families).
        layer_other: per-layer templates of no other category (hyper-connection mixing weights).
        layers_module: the in-memory path of the decoder layer list (``model.language_model.layers``),
            where routers and experts modules are looked up (default: any ``layers``/``blocks`` list).
        stacks: the layer stacks of an encoder-decoder family, layers numbered across them (encoder
            first); empty for a decoder-only family (its one stack is ``layer_prefix``/``schedule``).
        tie_from_root: a multimodal wrapper whose own ``tie_word_embeddings`` (not its text config's)
            decides whether the head is tied.
        capabilities: per command, ``None`` (supported) or the reason it is not (see
            :func:`moetool.arch.registry.require_capability`).
        merge: what merge needs to know about the experts (see :class:`MergeTraits`); derived families
            keep the defaults.
    """

    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]
    is_moe: bool
    fields: Mapping[str, tuple[str, ...]]
    globals_: Mapping[str, tuple[T, ...]]
    attention: tuple[T, ...]
    norms: tuple[T, ...]
    dense_mlp: tuple[T, ...] = ()
    router: tuple[T, ...] = ()
    routed_experts: tuple[T, ...] = ()
    shared_experts: tuple[T, ...] = ()
    mtp: tuple[T, ...] = ()
    expert_layout: ExpertLayout = ExpertLayout.PER_EXPERT
    schedule: str = "all"
    routing: RoutingSpec = RoutingSpec(Routing.NONE)
    defaults: Mapping[str, Any] = field(default_factory=dict)
    flags: Mapping[str, tuple[str, bool] | Callable[[Mapping[str, Any]], bool]] = field(default_factory=dict)
    layer_prefix: str = "model.layers.{L}."
    text_config_key: str | None = None
    name_prefixes: tuple[str, ...] = ()
    dense_counterpart: str | None = None
    moe_counterpart: str | None = None
    layer_dims: Callable[[Mapping[str, Any], int, dict[str, Any]], dict[str, Any]] | None = None
    derive: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    router_module: str = "mlp.gate"
    router_output: RouterOutput = RouterOutput.LOGITS_WEIGHTS_INDICES
    upcycle_targets: tuple[str, ...] = ()
    windows: WindowRule | None = None
    shared_expert_gate: str | None = None
    experts_module: str = "mlp.experts"
    experts_protocol: ExpertsProtocol = ExpertsProtocol.GATE_UP_DOWN
    derived: bool = False
    default_exprs: Mapping[str, str] = field(default_factory=dict)
    conditions: tuple[str, ...] = ()
    global_conditions: frozenset[str] = frozenset()
    mtp_fields: tuple[str, ...] = ()
    mtp_prefixes: tuple[str, ...] = ()
    model_class: str | None = None
    capabilities: Mapping[str, str | None] = field(default_factory=dict)
    layer_other: tuple[T, ...] = ()
    layers_module: str | None = None
    stacks: tuple[Stack, ...] = ()
    tie_from_root: bool = False
    merge: MergeTraits = MergeTraits()

    def layer_templates(self) -> dict[str, tuple[T, ...]]:
        """Per-layer templates by category (MoE and dense parts both listed)."""
        return {
            "attention": self.attention,
            "norms": self.norms,
            "dense_mlp": self.dense_mlp,
            "router": self.router,
            "routed_experts": self.routed_experts,
            "shared_experts": self.shared_experts,
            "other": self.layer_other,
        }
