"""What merging needs to know about a family beyond the registry (moetool/arch).

The registry says where routers and experts live and how they are stored; this table adds the few
facts that only a command rewriting the experts needs: which families have plain SwiGLU experts
(the only kind merged here), where the activation name is, whether the router weight scales the
expert's input instead of its output (Llama-4), and DeepSeek's group-limited routing constraints.
It is data keyed by the registry's family name, so no code below branches on model types; the
entries belong in :class:`moetool.arch.spec.FamilySpec` once that file is free to change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from moetool.arch.dims import get_path
from moetool.arch.spec import FamilySpec
from moetool.errors import UnsupportedArchitectureError


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
    """Merge-specific facts of one family.

    Attributes:
        act_keys: config keys (dotted) holding the experts' activation name, first present wins.
        router_scales_input: the router weight multiplies the expert's input (Llama-4) rather than
            its output; an expert's contribution is then ``E(w x)``, not ``w E(x)``.
        groups: group-limited routing, when the family has it.
        extra_expert_keys: config keys that also hold the routed expert count (besides the
            registry's ``E`` fields and their aliases).
    """

    act_keys: tuple[str, ...] = ("hidden_act",)
    router_scales_input: bool = False
    groups: GroupRule | None = None
    extra_expert_keys: tuple[str, ...] = ()

    def activation(self, config: Mapping[str, Any]) -> str:
        """The experts' activation name (``silu`` when the config leaves it out, as transformers does)."""
        for key in self.act_keys:
            value = get_path(config, key)
            if isinstance(value, str):
                return value
        return "silu"


TRAITS: dict[str, MergeTraits] = {
    "mixtral": MergeTraits(),
    "qwen2_moe": MergeTraits(),
    "qwen3_moe": MergeTraits(),
    "qwen3_next": MergeTraits(),
    "deepseek_v2": MergeTraits(groups=GroupRule(min_per_group=1)),
    "deepseek_v3": MergeTraits(groups=GroupRule(min_per_group=2)),
    "olmoe": MergeTraits(),
    "minimax_m2": MergeTraits(),
    "hunyuan_moe": MergeTraits(),
    "granitemoe": MergeTraits(),
    "dbrx": MergeTraits(act_keys=("ffn_config.ffn_act_fn.name",)),
    "llama4": MergeTraits(router_scales_input=True),
}

# Families the registry knows whose experts merge cannot handle, and why.
REFUSED: dict[str, str] = {
    "gpt_oss": (
        "gpt-oss experts use a clamped SwiGLU with biases and interleaved gate/up columns, and are usually "
        "stored as MXFP4; averaging them is not supported"
    ),
    "deepseek_moe": (
        "DeepSeekMoE 16B needs its own Python code (no transformers class), so its output could not be "
        "loaded or checked"
    ),
}


def traits_for(spec: FamilySpec) -> MergeTraits:
    """The merge traits of a family.

    Raises:
        UnsupportedArchitectureError: ``NOT_MOE`` for a dense family, ``UNSUPPORTED_ARCH`` for one whose
            experts merge does not handle.
    """
    if not spec.is_moe:
        raise UnsupportedArchitectureError(
            f"{spec.name} is a dense model family: there are no experts to merge",
            hint="merge takes a Mixture-of-Experts checkpoint (Mixtral, Qwen-MoE, DeepSeek, ...)",
            code="NOT_MOE",
        )
    if spec.name in REFUSED:
        raise UnsupportedArchitectureError(
            f"merge does not support {spec.name}: {REFUSED[spec.name]}",
            hint=f"supported families: {', '.join(sorted(TRAITS))}",
        )
    traits = TRAITS.get(spec.name)
    if traits is None:
        raise UnsupportedArchitectureError(
            f"merge does not support the {spec.name} family yet",
            hint=f"supported families: {', '.join(sorted(TRAITS))}",
        )
    return traits
