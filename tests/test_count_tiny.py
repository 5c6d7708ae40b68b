"""Header counting, config-only counting and the instantiated transformers model agree exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from moetool.count.params import count_from_checkpoint, count_from_config
from moetool.io.checkpoint import Checkpoint
from tests.tiny import ALL_TYPES, DENSE_TYPES, MOE_TYPES, build_tiny, stored_numel

# Variants that flip structural switches: tied embeddings, biases, interleaving, dense layers.
VARIANTS: list[tuple[str, dict]] = [
    *[(t, {}) for t in ALL_TYPES],
    ("mixtral", {"tie_word_embeddings": True}),
    ("llama", {"attention_bias": True, "mlp_bias": True}),
    ("qwen3_moe", {"attention_bias": True, "decoder_sparse_step": 2, "mlp_only_layers": []}),
    ("qwen2_moe", {"qkv_bias": False}),
    ("deepseek_v2", {"q_lora_rank": 12, "n_shared_experts": 2, "first_k_dense_replace": 0}),
    ("deepseek_v3", {"num_nextn_predict_layers": 1}),
    ("olmoe", {"num_experts_per_tok": 1, "num_experts": 6}),
    ("gpt_oss", {"num_experts_per_tok": 3}),
    ("llama4_text", {"interleave_moe_layer_step": 1, "num_experts_per_tok": 2}),
    ("granitemoe", {"tie_word_embeddings": True}),
]


def _ids(variant: tuple[str, dict]) -> str:
    model_type, overrides = variant
    return model_type + ("-" + "-".join(f"{k}={v}" for k, v in overrides.items()) if overrides else "")


def independent_active(model, config) -> int:
    """Active parameters computed from the in-memory transformers model, without moetool's templates.

    Routed experts are the tensors under an ``experts`` module that is not a shared expert; each
    MoE layer contributes top_k / num_experts of them; everything else counts in full.
    """
    import re

    top_k = getattr(config, "num_experts_per_tok", None) or getattr(config, "moe_topk", None)
    num_experts = (
        getattr(config, "num_local_experts", None)
        or getattr(config, "num_experts", None)
        or getattr(config, "n_routed_experts", None)
    )
    if config.model_type == "dbrx":
        top_k, num_experts = config.ffn_config.moe_top_k, config.ffn_config.moe_num_experts
    routed: dict[str, int] = {}
    other = 0
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen and tensor.numel():
            continue
        seen.add(tensor.data_ptr())
        match = re.search(r"(?:layers|blocks)\.(\d+)\.", name)
        parts = name.split(".")
        is_routed = any(p == "experts" or p in ("input_linear", "output_linear") for p in parts) and not any(
            "shared" in p for p in parts
        )
        if match and is_routed:
            routed[match.group(1)] = routed.get(match.group(1), 0) + tensor.numel()
        else:
            other += tensor.numel()
    return other + sum(total * top_k // num_experts for total in routed.values())


@pytest.fixture(scope="module", params=VARIANTS, ids=_ids)
def tiny(request, tmp_path_factory):
    model_type, overrides = request.param
    path = tmp_path_factory.mktemp(model_type)
    model = build_tiny(model_type, path, **overrides)
    return model_type, overrides, path, model


def test_header_config_and_model_agree(tiny):
    _, _, path, model = tiny
    checkpoint = Checkpoint.open(path)
    from_headers = count_from_checkpoint(checkpoint)
    from_config = count_from_config(checkpoint.config)
    expected_total = stored_numel(model)

    assert from_headers.source == "safetensors"
    assert from_config.source == "config"
    assert from_headers.total_params == expected_total
    assert from_config.total_params == expected_total
    assert from_headers.active_params == from_config.active_params
    if from_config.categories["mtp"].total:
        # config.json declares MTP modules but save_pretrained does not store them: the difference is
        # confined to the mtp category, and said.
        assert from_headers.categories["mtp"].total == 0
        assert any("MTP" in w for w in from_headers.warnings)
        from_config.categories["mtp"].total = 0
        from_config.layers = [layer for layer in from_config.layers if layer.kind != "mtp"]
    for category, count in from_headers.categories.items():
        assert count.total == from_config.categories[category].total, category
        assert count.active == from_config.categories[category].active, category
    assert [layer.to_dict() for layer in from_headers.layers] == [layer.to_dict() for layer in from_config.layers]
    # No tensor of a supported family should need the name heuristics.
    assert not any("heuristics" in w for w in from_headers.warnings), from_headers.warnings
    assert not any("experts, config says" in w for w in from_headers.warnings), from_headers.warnings
    # What transformers saves passes moetool's validation as it is (no false alarm on any family).
    assert from_headers.findings == [] and from_config.findings == []


def test_active_matches_independent_computation(tiny):
    model_type, _, path, model = tiny
    report = count_from_checkpoint(Checkpoint.open(path))
    assert report.active_params == independent_active(model, model.config)
    if model_type in DENSE_TYPES:
        assert report.active_params == report.total_params
        assert not report.is_moe
    else:
        assert report.is_moe
        assert report.categories["routed_experts"].active < report.categories["routed_experts"].total


def test_tied_embeddings_count_once(tmp_path):
    model = build_tiny("mixtral", tmp_path, tie_word_embeddings=True)
    report = count_from_checkpoint(Checkpoint.open(tmp_path))
    assert report.tied_embeddings
    assert report.categories["lm_head"].total == 0
    assert report.categories["embedding"].total == 128 * 32
    assert report.total_params == stored_numel(model)
    # The shared matrix is the output head: the no-embedding convention keeps it.
    assert report.active_params_without_embedding == report.active_params


def test_moe_schedule_and_top_k_reported(tmp_path):
    build_tiny("qwen3_moe", tmp_path, num_hidden_layers=4, mlp_only_layers=[0], decoder_sparse_step=1)
    report = count_from_checkpoint(Checkpoint.open(tmp_path))
    assert report.moe_layers == [1, 2, 3]
    assert [layer.kind for layer in report.layers] == ["dense", "moe", "moe", "moe"]
    assert (report.num_experts, report.top_k) == (4, 2)
    moe_layer = report.layers[1]
    assert moe_layer.categories["routed_experts"].active * 4 == moe_layer.categories["routed_experts"].total * 2


def _add_mtp_module(path: Path) -> int:
    """Append a DeepSeek-V3 style MTP module (layer L) to a tiny checkpoint; return its parameter count."""
    import torch

    from moetool.arch.dims import resolve_dims
    from moetool.arch.plan import layer_tensors
    from moetool.arch.registry import family_for_config
    from moetool.io.checkpoint import load_config

    config = load_config(path)
    spec = family_for_config(config)
    dims = resolve_dims(spec, {**config, "num_nextn_predict_layers": 1})
    layer = dims.num_layers
    prefix = spec.layer_prefix.format(L=layer)
    extra = {t.name: torch.zeros(t.shape) for t in layer_tensors(spec, dims, layer, moe=True)}
    for name, shape in (
        ("embed_tokens.weight", (128, 32)),
        ("enorm.weight", (32,)),
        ("hnorm.weight", (32,)),
        ("eh_proj.weight", (32, 64)),
        ("shared_head.norm.weight", (32,)),
        ("shared_head.head.weight", (128, 32)),
    ):
        extra[prefix + name] = torch.zeros(shape)
    tensors = load_file(path / "model.safetensors")
    tensors.update(extra)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return sum(t.numel() for t in extra.values())


def test_mtp_is_its_own_category(tmp_path):
    model = build_tiny("deepseek_v3", tmp_path, num_nextn_predict_layers=1)
    mtp_params = _add_mtp_module(tmp_path)
    checkpoint = Checkpoint.open(tmp_path)
    from_headers = count_from_checkpoint(checkpoint)
    from_config = count_from_config(checkpoint.config)
    assert from_headers.categories["mtp"].total == mtp_params == from_config.categories["mtp"].total
    # total_params leaves MTP out, like the published 671B and like transformers' model.
    assert from_headers.total_params == stored_numel(model) == from_config.total_params
    assert from_headers.total_params_with_mtp == stored_numel(model) + mtp_params
    assert from_headers.categories["mtp"].active == 0
    assert from_headers.mtp_active_params > 0
    assert from_headers.layers[-1].kind == "mtp"


@pytest.mark.parametrize("model_type", MOE_TYPES[:3])
def test_json_document_schema(tmp_path, model_type):
    build_tiny(model_type, tmp_path)
    doc = count_from_checkpoint(Checkpoint.open(tmp_path)).to_json(per_layer=True)
    for key in (
        "schema_version",
        "model",
        "model_type",
        "total_params",
        "active_params",
        "num_experts",
        "top_k",
    ):
        assert key in doc
    assert doc["schema_version"] == 1
    assert set(doc["categories"]) >= {
        "embedding",
        "lm_head",
        "attention",
        "router",
        "routed_experts",
        "shared_experts",
        "dense_mlp",
        "norms",
        "mtp",
        "other",
    }
    assert sum(c["total"] for c in doc["categories"].values()) == doc["total_params_with_mtp"]
    assert sum(c["active"] for c in doc["categories"].values()) == doc["active_params"]
    assert len(doc["layers"]) == 3
