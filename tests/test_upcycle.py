"""upcycle: every dense family into its MoE layouts, exact at initialisation, and what it refuses.

Each output is loaded with stock transformers (no missing, unexpected or mis-shaped tensors) and its
float32 logits are compared with the dense model's on random tokens (max abs diff <= 1e-4).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from moetool.errors import MoetoolError, UnsupportedArchitectureError, UsageError
from moetool.io.checkpoint import Checkpoint
from moetool.upcycle import UpcycleOptions, VerificationError, build_plan, upcycle
from tests.tiny import build_tiny

# transformers initialises a zero-width shared expert (Qwen2-MoE without shared experts) before loading it.
pytestmark = [
    pytest.mark.filterwarnings("ignore:Initializing zero-element tensors"),
    pytest.mark.usefixtures("one_thread"),
]

TOKENS = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
EXPERTS_TOPK = [(8, 2), (4, 1), (6, 3)]
# (source, --arch, shared experts): the default target of each family, plus Qwen2-MoE for Llama and
# Mistral (the target that holds shared experts and dense layers for them).
TARGETS = [
    ("llama", None, 0),
    ("mistral", None, 0),
    ("qwen2", None, 0),
    ("qwen2", None, 1),
    ("qwen3", None, 0),
    ("llama", "qwen2_moe", 1),
    ("mistral", "qwen2_moe", 1),
]


def logits(folder: Path) -> tuple[torch.Tensor, dict]:
    model, info = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        return model.eval()(TOKENS).logits, info


@pytest.fixture(scope="module")
def dense(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """Each dense family once per module: its folder and its logits."""
    root = tmp_path_factory.mktemp("dense")
    out = {}
    for family in ("llama", "mistral", "qwen2", "qwen3"):
        build_tiny(family, root / family)
        out[family] = (root / family, logits(root / family)[0])
    return out


def assert_exact(folder: Path, reference: torch.Tensor) -> None:
    got, info = logits(folder)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert (got - reference).abs().max().item() <= 1e-4


@pytest.mark.parametrize("granularity", [1, 2])
@pytest.mark.parametrize(("experts", "top_k"), EXPERTS_TOPK)
@pytest.mark.parametrize(("family", "arch", "shared"), TARGETS)
def test_grid_reproduces_dense_logits(dense, tmp_path, family, arch, shared, experts, top_k, granularity):
    source, reference = dense[family]
    opts = UpcycleOptions(experts, top_k, granularity=granularity, shared_experts=shared, arch=arch)
    result = upcycle(source, tmp_path / "moe", opts, full_check=False)
    assert result.verification.status == "passed"
    config = json.loads((tmp_path / "moe" / "config.json").read_text())
    target = result.plan.target_family
    # The written config is one transformers accepts, with the expert arithmetic in the family's fields.
    parsed = AutoConfig.for_model(config["model_type"], **{k: v for k, v in config.items() if k != "model_type"})
    assert parsed.num_experts_per_tok == top_k * granularity
    assert result.plan.num_experts == experts * granularity
    if target.routing.renormalize_key:
        assert config[target.routing.renormalize_key] is True
    assert_exact(tmp_path / "moe", reference)


@pytest.mark.parametrize(
    ("family", "moe_layers", "expected"),
    [("qwen2", "every:2", [1]), ("qwen3", "0,2", [0, 2]), ("llama", "1-2", [1, 2])],
)
def test_interleaved_moe_layers(dense, tmp_path, family, moe_layers, expected):
    source, reference = dense[family]
    arch = "qwen2_moe" if family == "llama" else None
    result = upcycle(source, tmp_path / "moe", UpcycleOptions(4, 2, moe_layers=moe_layers, arch=arch))
    assert list(result.plan.moe_layers) == expected
    assert [c.name for c in result.verification.checks] == ["files", "layers", "experts", "logits"]
    names = Checkpoint.open(tmp_path / "moe").tensors
    dense_layers = sorted(set(range(3)) - set(expected))
    assert all(f"model.layers.{ly}.mlp.gate_proj.weight" in names for ly in dense_layers)
    assert_exact(tmp_path / "moe", reference)


def test_mixtral_refuses_interleaving_and_shared_experts(dense):
    source = Checkpoint.open(dense["mistral"][0])
    with pytest.raises(UsageError, match="use --arch qwen2_moe") as info:
        build_plan(source, UpcycleOptions(4, 2, moe_layers="every:2"))
    assert info.value.code == "INTERLEAVE_UNSUPPORTED"
    with pytest.raises(UsageError, match="mixtral has no shared experts") as info:
        build_plan(source, UpcycleOptions(4, 2, shared_experts=1))
    assert info.value.code == "SHARED_UNSUPPORTED"
    with pytest.raises(UsageError, match="no MoE family moetool writes from a qwen3 model has shared experts"):
        build_plan(Checkpoint.open(dense["qwen3"][0]), UpcycleOptions(4, 2, shared_experts=1))


@pytest.mark.parametrize(
    ("family", "arch", "needle"),
    [
        ("llama", "qwen3_moe", "self_attn.k_norm.weight"),
        ("qwen2", "mixtral", "k_proj.bias has no counterpart in mixtral"),
        ("llama", "llama", "not a Mixture-of-Experts family"),
        ("llama", "frobnicate", "unknown --arch"),
    ],
)
def test_incompatible_arch_refused(dense, family, arch, needle):
    with pytest.raises(UsageError, match=needle) as info:
        build_plan(Checkpoint.open(dense[family][0]), UpcycleOptions(4, 2, arch=arch))
    assert info.value.code == "ARCH_INCOMPATIBLE"


def test_arch_accepts_model_type_and_registry_name(dense):
    source = Checkpoint.open(dense["llama"][0])
    assert build_plan(source, UpcycleOptions(4, 2, arch="qwen2_moe")).config["qkv_bias"] is False


@pytest.mark.parametrize(
    ("overrides", "needle"),
    [({"attention_bias": True}, "mixtral has no self_attn.q_proj.bias"), ({"mlp_bias": True}, "MLP has biases")],
)
def test_source_features_the_target_cannot_hold(tmp_path, overrides, needle):
    build_tiny("llama", tmp_path / "m", **overrides)
    with pytest.raises(UsageError, match=needle) as info:
        build_plan(Checkpoint.open(tmp_path / "m"), UpcycleOptions(4, 2))
    assert info.value.code == "ARCH_INCOMPATIBLE"


@pytest.mark.parametrize("arch", [None, "qwen2_moe"])
def test_sliding_window_kept(tmp_path, arch):
    # A window shorter than the test sequence, so that getting it wrong changes the logits.
    build_tiny("mistral", tmp_path / "m", sliding_window=4)
    reference = logits(tmp_path / "m")[0]
    result = upcycle(tmp_path / "m", tmp_path / "moe", UpcycleOptions(4, 2, arch=arch))
    assert result.plan.config["sliding_window"] == 4
    assert_exact(tmp_path / "moe", reference)


def test_sliding_window_pattern_the_target_cannot_express(tmp_path):
    build_tiny("qwen3", tmp_path / "m", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    with pytest.raises(UsageError, match="cannot express the sliding-window pattern") as info:
        build_plan(Checkpoint.open(tmp_path / "m"), UpcycleOptions(4, 2))
    assert info.value.code == "ARCH_INCOMPATIBLE"


def test_qwen2_sliding_layers_kept(tmp_path):
    build_tiny("qwen2", tmp_path / "m", use_sliding_window=True, sliding_window=4, max_window_layers=1)
    reference = logits(tmp_path / "m")[0]
    upcycle(tmp_path / "m", tmp_path / "moe", UpcycleOptions(4, 2, granularity=2, shared_experts=1))
    assert_exact(tmp_path / "moe", reference)


# ----------------------------------------------------------------------------- dry run, shards, dtype


def test_dry_run_writes_nothing_and_predicts_the_size(dense, tmp_path):
    source = dense["qwen2"][0]
    opts = UpcycleOptions(6, 2, granularity=2, shared_experts=1, max_shard_size=40_000)
    planned = upcycle(source, tmp_path / "moe", opts, dry_run=True)
    assert planned.dry_run and not (tmp_path / "moe").exists() and list(tmp_path.iterdir()) == []
    result = upcycle(source, tmp_path / "moe", opts)
    shards = sorted((tmp_path / "moe").glob("*.safetensors"))
    assert len(shards) == len(planned.plan.shards) > 1
    assert sum(p.stat().st_size for p in shards) == planned.plan.predicted_bytes == result.bytes_written
    index = json.loads((tmp_path / "moe" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == planned.plan.tensor_bytes
    assert_exact(tmp_path / "moe", dense["qwen2"][1])


def test_shard_size_and_runs_do_not_change_tensor_bytes(dense, tmp_path):
    source = dense["llama"][0]
    upcycle(source, tmp_path / "one", UpcycleOptions(4, 2, granularity=2), verify=False)
    upcycle(source, tmp_path / "many", UpcycleOptions(4, 2, granularity=2, max_shard_size=20_000), verify=False)
    upcycle(source, tmp_path / "again", UpcycleOptions(4, 2, granularity=2), verify=False)
    one, many = Checkpoint.open(tmp_path / "one"), Checkpoint.open(tmp_path / "many")
    assert len(many.shards) > 3 and list(one.tensors) == list(many.tensors)
    for name in one.tensors:
        assert torch.equal(one.read_tensor(name), many.read_tensor(name))
    same = (tmp_path / "one" / "model.safetensors").read_bytes() == (
        tmp_path / "again" / "model.safetensors"
    ).read_bytes()
    assert same  # deterministic: same seed, same bytes


def test_bfloat16_output(dense, tmp_path):
    source, _ = dense["qwen3"]
    result = upcycle(source, tmp_path / "moe", UpcycleOptions(4, 2, granularity=2, dtype="bfloat16"))
    assert result.plan.config["dtype"] == "bfloat16"
    assert {i.dtype for i in Checkpoint.open(tmp_path / "moe").tensors.values()} == {"BF16"}
    assert result.verification.status == "passed"


# ----------------------------------------------------------------------------- symmetry breaking


def test_noise_and_reinit_change_outputs_and_are_reported(dense, tmp_path):
    source, reference = dense["llama"]
    opts = UpcycleOptions(4, 2, noise=0.5, reinit_ratio=0.25, seed=3)
    result = upcycle(source, tmp_path / "moe", opts)
    assert not result.plan.exact
    assert result.verification.status == "not_exact_by_design"
    assert any("by design" in note for note in result.verification.notes)
    doc = result.to_json()
    assert doc["plan"]["symmetry_breaking"] == {
        "router_init": "random",
        "router_std": 0.02,
        "noise": 0.5,
        "reinit_ratio": 0.25,
        "seed": 3,
        "experts_identical": False,
    }
    got, info = logits(tmp_path / "moe")
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert (got - reference).abs().max().item() > 1e-3
    card = (tmp_path / "moe" / "README.md").read_text()
    assert "differ from the dense model" in card and "symmetry: noise" in card
    moe = Checkpoint.open(tmp_path / "moe")
    experts = [moe.read_tensor(f"model.layers.0.block_sparse_moe.experts.{e}.w1.weight") for e in range(4)]
    assert not torch.equal(experts[0], experts[1])


def test_reinit_touches_the_same_neurons_in_gate_up_and_down(dense, tmp_path):
    source = dense["mistral"][0]
    upcycle(source, tmp_path / "moe", UpcycleOptions(4, 2, reinit_ratio=0.5, seed=1), verify=False)
    moe, src = Checkpoint.open(tmp_path / "moe"), Checkpoint.open(source)
    w1 = moe.read_tensor("model.layers.1.block_sparse_moe.experts.2.w1.weight")
    w3 = moe.read_tensor("model.layers.1.block_sparse_moe.experts.2.w3.weight")
    w2 = moe.read_tensor("model.layers.1.block_sparse_moe.experts.2.w2.weight")
    changed_gate = (w1 != src.read_tensor("model.layers.1.mlp.gate_proj.weight")).any(dim=1)
    changed_up = (w3 != src.read_tensor("model.layers.1.mlp.up_proj.weight")).any(dim=1)
    changed_down = (w2 != src.read_tensor("model.layers.1.mlp.down_proj.weight")).any(dim=0)
    assert changed_gate.sum() == 24  # half of the 48 neurons
    assert torch.equal(changed_gate, changed_up) and torch.equal(changed_gate, changed_down)


def test_zero_router_exact_and_refused_with_granularity(dense, tmp_path):
    source, reference = dense["qwen3"]
    upcycle(source, tmp_path / "moe", UpcycleOptions(4, 2, router_init="zeros"))
    assert_exact(tmp_path / "moe", reference)
    with pytest.raises(UsageError, match="zeros cannot be used with --granularity"):
        build_plan(Checkpoint.open(source), UpcycleOptions(4, 2, granularity=2, router_init="zeros"))


def test_kmeans_router_from_a_dataset(tmp_path):
    from tests.helpers import make_tokenizer

    source = tmp_path / "dense"
    build_tiny("llama", source)
    make_tokenizer(path=source)
    reference = logits(source)[0]
    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(["the cat sat on a mat", "def sum of two is four", "the dog ran in park"] * 10))
    from moetool.data import DatasetSpec

    opts = UpcycleOptions(4, 2, granularity=2, router_init="kmeans", seed=5)
    result = upcycle(
        source, tmp_path / "moe", opts, kmeans_data=DatasetSpec(str(data), seq_len=16, max_tokens=200, batch_size=4)
    )
    assert result.verification.status == "passed"
    router = Checkpoint.open(tmp_path / "moe").read_tensor("model.layers.0.block_sparse_moe.gate.weight")
    assert torch.equal(router[0], router[1]) and not torch.equal(router[0], router[2])  # rows per copy, per shard
    assert_exact(tmp_path / "moe", reference)
    with pytest.raises(UsageError, match="needs --dataset"):
        upcycle(source, tmp_path / "x", opts)


# ----------------------------------------------------------------------------- refusals and failures


def test_refusals_with_codes(dense, tmp_path):
    build_tiny("mixtral", tmp_path / "moe-src")
    with pytest.raises(UnsupportedArchitectureError) as info:
        build_plan(Checkpoint.open(tmp_path / "moe-src"), UpcycleOptions(4, 2))
    assert info.value.code == "ALREADY_MOE"
    source = Checkpoint.open(dense["llama"][0])
    for opts, code in [
        (UpcycleOptions(4, 5), "BAD_TOP_K"),
        (UpcycleOptions(4, 0), "BAD_TOP_K"),
        (UpcycleOptions(4, 2, granularity=5), "BAD_GRANULARITY"),
        (UpcycleOptions(1, 1), "USAGE"),
        (UpcycleOptions(4, 2, moe_layers="7"), "USAGE"),
        (UpcycleOptions(4, 2, reinit_ratio=1.0), "USAGE"),
    ]:
        with pytest.raises(UsageError) as info:
            build_plan(source, opts)
        assert info.value.code == code, opts
    quantized = Checkpoint.open(dense["llama"][0])
    quantized.config = {**quantized.config, "quantization_config": {"quant_method": "gptq"}}
    with pytest.raises(UnsupportedArchitectureError) as info:
        build_plan(quantized, UpcycleOptions(4, 2))
    assert info.value.code == "QUANTIZED_INPUT"
    with pytest.raises(MoetoolError) as info:
        upcycle(dense["llama"][0], dense["llama"][0] / "inside", UpcycleOptions(4, 2))
    assert info.value.code == "OUTPUT_OVERLAPS_INPUT"


def test_failed_verification_leaves_nothing(dense, tmp_path, monkeypatch):
    from moetool.upcycle import tensors

    original = tensors._LayerBuilder._expert

    def broken(self, recipe, dtype):
        piece = original(self, recipe, dtype)
        if self.layer == 1 and recipe.copy == 2 and recipe.role == 2:
            return piece * 1.5
        return piece

    monkeypatch.setattr(tensors._LayerBuilder, "_expert", broken)
    with pytest.raises(VerificationError, match=r"verification failed: (layers|experts) check") as info:
        upcycle(dense["llama"][0], tmp_path / "moe", UpcycleOptions(4, 2), full_check=False)
    assert info.value.code == "VERIFY_FAILED"
    assert list(tmp_path.iterdir()) == []


def test_registry_targets_are_writable_moe_families():
    from moetool.arch.families import FAMILIES
    from moetool.arch.registry import get_family

    for spec in FAMILIES:
        if not spec.upcycle_targets:
            continue
        assert not spec.is_moe and spec.moe_counterpart == spec.upcycle_targets[0]
        for name in spec.upcycle_targets:
            target = get_family(name)
            assert target.is_moe and target.windows is not None and target.windows.write is not None
