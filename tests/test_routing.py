"""profile-routing sees exactly the expert choices the model makes, for every routing family."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from moetool.arch.registry import family_for_config
from moetool.routing.profile import profile_routing
from moetool.routing.stats import RoutingStats
from moetool.routing.thresholds import check_thresholds, parse_threshold
from tests.tiny import MOE_TYPES, tiny_config


@dataclass
class FakeBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    domains: list


# Family-specific switches that make the routing rule matter: non-zero correction biases, groups.
ROUTING_VARIANTS = [
    *[(t, {}) for t in MOE_TYPES],
    ("deepseek_v2", {"topk_method": "group_limited_greedy", "n_group": 2, "topk_group": 1}),
    ("qwen3_moe", {"norm_topk_prob": True}),
]


def build_model(model_type: str, overrides: dict, seed: int = 0):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides)).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn_like(buffer) * 0.5)  # make the bias change the choices
    return model


def reference_choices(model, model_type: str, logits: torch.Tensor, module) -> torch.Tensor:
    """Expert choices recomputed from router logits with each family's published rule."""
    config = model.config
    if model_type == "dbrx":
        k = config.ffn_config.moe_top_k
    else:
        k = getattr(config, "num_experts_per_tok", None) or config.moe_topk
    logits = logits.float()
    if model_type == "deepseek_v3":
        scores = logits.sigmoid()
        choice = scores + module.gate.e_score_correction_bias
        groups = config.n_group
        per_group = choice.view(-1, groups, choice.shape[-1] // groups).topk(2, dim=-1).values.sum(-1)
        keep = torch.zeros_like(per_group).scatter_(1, per_group.topk(config.topk_group, dim=-1).indices, 1)
        keep = keep.repeat_interleave(choice.shape[-1] // groups, dim=1).bool()
        return choice.masked_fill(~keep, float("-inf")).topk(k, dim=-1).indices
    if model_type == "minimax_m2":
        return (logits.sigmoid() + module.e_score_correction_bias).topk(k, dim=-1).indices
    if model_type == "deepseek_v2" and config.topk_method == "group_limited_greedy":
        probs = logits.softmax(-1)
        groups = config.n_group
        per_group = probs.view(-1, groups, probs.shape[-1] // groups).max(-1).values
        keep = torch.zeros_like(per_group).scatter_(1, per_group.topk(config.topk_group, dim=-1).indices, 1)
        keep = keep.repeat_interleave(probs.shape[-1] // groups, dim=1).bool()
        return probs.masked_fill(~keep, 0.0).topk(k, dim=-1).indices
    if model_type in ("gpt_oss", "granitemoe", "llama4_text"):
        return logits.topk(k, dim=-1).indices
    return logits.softmax(-1).topk(k, dim=-1).indices


def moe_blocks(model, model_type):
    spec = family_for_config(model.config.to_dict())
    block_name = spec.router_module.rsplit(".", 1)[0]
    router_attr = spec.router_module.rsplit(".", 1)[1]
    blocks = {}
    for name, module in model.named_modules():
        parts = name.split(".")
        if name.endswith("." + block_name) and hasattr(module, router_attr):
            blocks[int(parts[-2])] = module
    return blocks, router_attr


def reference_counts(model, model_type, input_ids, attention_mask) -> dict[int, torch.Tensor]:
    """Per-layer expert counts from each MoE block's input and the router weights (no moetool code)."""
    blocks, router_attr = moe_blocks(model, model_type)
    captured: dict[int, torch.Tensor] = {}
    handles = [
        block.register_forward_pre_hook(lambda _m, args, layer=layer: captured.__setitem__(layer, args[0]))
        for layer, block in blocks.items()
    ]
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    for handle in handles:
        handle.remove()
    counts = {}
    mask = attention_mask.reshape(-1).bool()
    for layer, hidden in captured.items():
        router = getattr(blocks[layer], router_attr)
        inner = getattr(router, "layer", None) or getattr(router, "wg", None) or router  # DBRX, Hunyuan
        weight = inner.weight
        bias = getattr(router, "bias", None) if model_type == "gpt_oss" else None
        logits = F.linear(
            hidden.reshape(-1, hidden.shape[-1]).float(), weight.float(), None if bias is None else bias.float()
        )
        choices = reference_choices(model, model_type, logits, blocks[layer])[mask]
        counts[layer] = torch.bincount(choices.reshape(-1), minlength=logits.shape[-1])
    return counts, out


def make_batch(seed=1, rows=3, length=12, pad_last=5):
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, 128, (rows, length), generator=generator)
    mask = torch.ones(rows, length, dtype=torch.long)
    mask[-1, length - pad_last :] = 0  # right padding in the last row must not be counted
    return FakeBatch(input_ids, mask, ["code", "prose", "prose"][:rows])


@pytest.mark.parametrize(
    ("model_type", "overrides"), ROUTING_VARIANTS, ids=lambda v: str(v) if isinstance(v, str) else ""
)
def test_counts_equal_reference(model_type, overrides):
    model = build_model(model_type, overrides)
    batch = make_batch()
    expected, _ = reference_counts(model, model_type, batch.input_ids, batch.attention_mask)
    stats = profile_routing(model, [batch], domains=["code", "prose"], name=model_type)
    tokens = int(batch.attention_mask.sum())
    assert stats.tokens == tokens
    assert [layer.layer for layer in stats.layers] == sorted(expected)
    for layer in stats.layers:
        assert layer.counts == expected[layer.layer].tolist(), layer.layer
        assert sum(layer.counts) == tokens * layer.top_k
        # Per-domain counts partition the totals.
        summed = [sum(col) for col in zip(*layer.domain_counts.values(), strict=True)]
        assert summed == layer.counts
        assert sum(layer.coactivation[e][e] for e in range(layer.num_experts)) == tokens * layer.top_k
    assert sum(stats.domain_tokens.values()) == tokens
    assert stats.domain_tokens["code"] == 12


@pytest.mark.parametrize("model_type", ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe"])
def test_aux_loss_equals_transformers(model_type):
    """Switch aux loss equals transformers' load_balancing_loss_func on the same batch (no padding)."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = build_model(model_type, {})
    batch = make_batch(pad_last=0)
    with torch.no_grad():
        out = model(input_ids=batch.input_ids, output_router_logits=True)
    stats = profile_routing(model, [batch])
    k = model.config.num_experts_per_tok
    num_experts = stats.num_experts
    router_logits = [r for r in out.router_logits if r is not None]
    expected_all = load_balancing_loss_func(tuple(router_logits), num_experts, k).item()
    assert stats.aux_loss == pytest.approx(expected_all, abs=1e-5)
    for layer, logits in zip(stats.layers, router_logits, strict=True):
        expected = load_balancing_loss_func((logits,), num_experts, k).item()
        assert layer.aux_loss == pytest.approx(expected, abs=1e-5)


def test_metrics_on_a_known_distribution():
    stats = _stats_with_counts([[10, 10, 10, 10], [40, 0, 0, 0]])
    balanced, skewed = stats.layers
    assert balanced.cv == 0 and balanced.entropy == pytest.approx(1.0) and balanced.gini == 0
    assert balanced.max_mean == 1.0 and balanced.dead_experts == []
    assert skewed.cv == pytest.approx(math.sqrt(3)) and skewed.entropy == 0
    assert skewed.max_mean == 4.0 and skewed.dead_experts == [1, 2, 3]
    assert skewed.gini == pytest.approx(0.75)


def _stats_with_counts(rows):
    from moetool.routing.stats import LayerStats

    layers = [
        LayerStats(
            layer=i,
            tokens=sum(c) // 1,
            top_k=1,
            counts=c,
            prob_mean=[0.25] * 4,
            coactivation=[[0] * 4 for _ in range(4)],
            dropped={"1.0": 0.0, "1.25": 0.0, "1.5": 0.0, "2.0": 0.0},
            z_loss=1.0,
            top1_prob=0.5,
            top1_top2_margin=0.1,
        )
        for i, c in enumerate(rows)
    ]
    return RoutingStats("m", "mixtral", "mixtral", "softmax_topk", 4, 1, 40, layers)


def test_capacity_drops():
    """One window of 8 tokens, top-1, 4 experts: capacity at C=1 is 2 tokens per expert."""
    model = build_model("mixtral", {"num_experts_per_tok": 1})
    with torch.no_grad():
        router = model.model.layers[0].mlp.gate
        router.weight.zero_()
        router.weight[0] += 1.0  # every token prefers expert 0 in layer 0
    batch = FakeBatch(torch.randint(1, 128, (1, 8)), torch.ones(1, 8, dtype=torch.long), [None])
    stats = profile_routing(model, [batch])
    first = stats.layers[0]
    hidden_positive = first.counts[0]
    # Tokens beyond 2 per expert (at C=1) are dropped; at C=2, beyond 4.
    assert first.dropped["1.0"] == pytest.approx(sum(max(0, c - 2) for c in first.counts) / 8)
    assert first.dropped["2.0"] == pytest.approx(sum(max(0, c - 4) for c in first.counts) / 8)
    assert hidden_positive >= 0


def test_thresholds():
    stats = _stats_with_counts([[10, 10, 10, 10], [40, 0, 0, 0]])
    violations = check_thresholds(stats, [parse_threshold("cv>0.5"), parse_threshold("dead >= 1")])
    assert [(v.layer, v.threshold.metric) for v in violations] == [(1, "cv"), (1, "dead")]
    assert "layer 1: cv=1.732" in str(violations[0])
    assert check_thresholds(stats, [parse_threshold("entropy<0")]) == []
    assert parse_threshold("maxvio>2").metric == "max_mean"
    assert parse_threshold("drop@1.25>0.1").metric == "drop@1.25"


@pytest.mark.parametrize("bad", ["cv", "cv>>1", "frobs>1", "cv>abc", ""])
def test_bad_thresholds(bad):
    from moetool.errors import UsageError

    with pytest.raises(UsageError):
        parse_threshold(bad)


def test_stats_file_round_trip(tmp_path):
    model = build_model("qwen2_moe", {})
    stats = profile_routing(model, [make_batch()], domains=["code", "prose"], name="tiny")
    path = tmp_path / "routing-stats.json"
    stats.save(path)
    loaded = RoutingStats.load(path)
    assert loaded.to_json() == stats.to_json()
    assert loaded.count_matrix() == stats.count_matrix()


def test_dense_model_refused():
    from moetool.errors import UnsupportedArchitectureError

    model = build_model("llama", {})
    with pytest.raises(UnsupportedArchitectureError):
        profile_routing(model, [make_batch()])
