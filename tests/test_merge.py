"""moetool merge on tiny checkpoints of every supported family: outputs load in stock transformers with M
experts and nothing missing, identical experts merge exactly, --to-dense of an upcycled model gives back
the dense model, sizes are as predicted, and stats files work in place of a dataset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moetool.arch import family_for_config, get_family
from moetool.data import DatasetSpec
from moetool.errors import MoetoolError, UnsupportedArchitectureError, UsageError
from moetool.merge import MergeOptions
from moetool.merge import merge as merge_model
from moetool.merge.api import METHODS
from tests.helpers import corpus, make_tokenizer
from tests.tiny import MOE_TYPES, build_tiny

SUPPORTED = [t for t in MOE_TYPES if "merge" not in family_for_config({"model_type": t}).capabilities]
# Families whose top-k weights sum to a constant (renormalised, or a fixed scaling): with identical
# experts the layer output is then the same whatever the router picks, so any merge must be exact.
# DeepSeek-V2 (no renormalisation at all) and Llama-4 (a sigmoid weight on the expert's input) are not.
RENORM_OVERRIDES = {
    "mixtral": {},
    "qwen2_moe": {"norm_topk_prob": True},
    "qwen3_moe": {"norm_topk_prob": True},
    "qwen3_next": {},
    "deepseek_v3": {},
    "olmoe": {"norm_topk_prob": True},
    "granitemoe": {},
    "hunyuan_v1_moe": {},
    "minimax_m2": {},
    "dbrx": {},
}


def documents(n: int = 40):
    return corpus(n)


def merge(model, out, *, calibration=None, stats=None, seq_len=256, batch_size=8, max_tokens=50_000, **options):
    """merge() with the calibration documents and sizes as these tests give them."""
    data = None
    if calibration is not None:
        data = DatasetSpec.of_documents(calibration, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size)
    return merge_model(model, out, MergeOptions(**options), calibration=data, stats=stats)


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging

    logging.set_verbosity_error()
    model, info = AutoModelForCausalLM.from_pretrained(str(path), output_loading_info=True, dtype=torch.float32)
    return model.eval(), info


def logits_of(model, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(3, 40, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids).logits


def make_identical_experts(model, num_experts: int) -> None:
    """Every routed expert of every layer becomes a copy of expert 0 (in-memory transformers layout)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".experts." not in name and not name.endswith("experts.gate_up_proj"):
                continue
            if "shared" in name:
                continue
            if param.shape[0] == num_experts:
                param.copy_(param[0:1].expand_as(param))
            elif param.dim() == 2 and param.shape[0] % num_experts == 0:  # DBRX: [E*I, H]
                view = param.view(num_experts, -1, param.shape[-1])
                view.copy_(view[0:1].expand_as(view))


def build(model_type: str, path: Path, **overrides):
    model = build_tiny(model_type, path, **overrides)
    make_tokenizer(path=path)
    return model


def config_of(path: Path) -> dict:
    return json.loads((path / "config.json").read_text())


# ----------------------------------------------------------------------------- every family


@pytest.mark.parametrize("model_type", SUPPORTED)
def test_merge_to_two_loads_in_transformers(model_type, tmp_path):
    src = tmp_path / "src"
    build(model_type, src)
    out = tmp_path / "out"
    result = merge(
        str(src),
        out,
        num_experts=2,
        method="merge-frequency",
        calibration=documents(),
        seq_len=16,
        device="cpu",
        evaluate=False,
        sample_tokens=256,
    )
    model, info = load_hf(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    cfg = config_of(out)
    from moetool.arch import family_for_config, resolve_dims

    spec = family_for_config(cfg)
    dims = resolve_dims(spec, cfg)
    assert dims.values["E"] == 2
    top_k = dims.values["K"]
    assert (max(top_k) if isinstance(top_k, list) else top_k) <= 2
    # The router of every MoE layer has 2 rows (and DeepSeek/MiniMax correction biases 2 entries).
    from safetensors import safe_open

    from moetool.merge.layout import LayerTensors

    layout = LayerTensors(spec, dims)
    with safe_open(str(out / "model.safetensors"), "pt") as fh:
        for layer in sorted(dims.moe_layers):
            for name in layout.router_names(layer):
                assert fh.get_slice(name).get_shape()[0] == 2, name
    if "n_group" in cfg:
        assert 2 % cfg["n_group"] == 0 and cfg["topk_group"] <= cfg["n_group"]
    assert result.written_bytes == result.predicted_bytes
    assert (out / "model.safetensors").stat().st_size < (src / "model.safetensors").stat().st_size
    assert torch.isfinite(logits_of(model)).all()
    assert (out / "tokenizer.json").exists() and "base_model_relation" not in (out / "README.md").read_text()


IDENTICAL_CASES = [("mixtral", method) for method in METHODS] + [
    (model_type, "merge-frequency") for model_type in RENORM_OVERRIDES if model_type != "mixtral"
]


@pytest.fixture(scope="module")
def identical_sources(tmp_path_factory):
    """Per family, a tiny checkpoint whose experts are all equal, and its logits (built once per worker)."""
    cache: dict[str, tuple[Path, torch.Tensor]] = {}

    def get(model_type: str) -> tuple[Path, torch.Tensor]:
        if model_type not in cache:
            src = tmp_path_factory.mktemp(f"identical-{model_type}") / "src"
            model = build(model_type, src, **RENORM_OVERRIDES[model_type])
            from moetool.arch import family_for_config, resolve_dims

            n = resolve_dims(family_for_config(config_of(src)), config_of(src)).values["E"]
            make_identical_experts(model, n)
            model.save_pretrained(src)
            cache[model_type] = (src, logits_of(load_hf(src)[0]))
        return cache[model_type]

    return get


@pytest.mark.parametrize(("model_type", "method"), IDENTICAL_CASES)
def test_identical_experts_merge_exactly(model_type, method, identical_sources, tmp_path):
    """Families whose routing weights sum to a constant: any merge of equal experts keeps the logits (fp32)."""
    src, expected = identical_sources(model_type)
    out = tmp_path / "out"
    merge(str(src), out, num_experts=2, method=method, calibration=documents(), seq_len=16, device="cpu",
          evaluate=False, sample_tokens=256, refit_router=method == "merge-router")  # fmt: skip
    merged, _ = load_hf(out)
    diff = (logits_of(merged) - expected).abs().max().item()
    assert diff <= 1e-5, (method, diff)


# ----------------------------------------------------------------------------- to dense


def upcycle_by_hand(dense_path: Path, moe_path: Path, num_experts: int = 4) -> None:
    """A tiny Mixtral whose experts are all the dense Mistral's MLP (what upcycling writes)."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    dense = load_file(str(dense_path / "model.safetensors"))
    # The same attention, norms and RoPE as the dense model: only the MLP becomes experts.
    dense_config = config_of(dense_path)
    keys = AutoConfig.for_model("mixtral").to_dict()
    shared = {k: v for k, v in dense_config.items() if k in keys and k not in ("model_type", "architectures")}
    build("mixtral", moe_path, **{**shared, "num_local_experts": num_experts, "num_experts_per_tok": 2})
    moe = load_file(str(moe_path / "model.safetensors"))
    out = {}
    for name, tensor in moe.items():
        if ".block_sparse_moe.experts." in name:
            layer = name.split(".")[2]
            proj = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}[name.split(".")[-2]]
            out[name] = dense[f"model.layers.{layer}.mlp.{proj}.weight"].clone()
        elif ".block_sparse_moe.gate." in name:
            out[name] = tensor
        else:
            out[name] = dense[name].clone()
    save_file(out, str(moe_path / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("strategy", ["top1", "average", "concat"])
def test_to_dense_of_an_upcycled_model_gives_back_the_dense_model(strategy, tmp_path):
    dense_path = tmp_path / "dense"
    build("mistral", dense_path)
    upcycled = tmp_path / "moe"
    upcycle_by_hand(dense_path, upcycled)
    out = tmp_path / "back"
    result = merge(
        str(upcycled),
        out,
        to_dense=True,
        dense_strategy=strategy,
        calibration=documents(),
        seq_len=16,
        device="cpu",
        evaluate=False,
        sample_tokens=256,
    )
    assert config_of(out)["model_type"] == "mistral" and config_of(out)["architectures"] == ["MistralForCausalLM"]
    back, info = load_hf(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    original, _ = load_hf(dense_path)
    assert (logits_of(back) - logits_of(original)).abs().max().item() <= 1e-5
    assert result.written_bytes == result.predicted_bytes
    assert result.intermediate_size == 48 * (2 if strategy == "concat" else 1)


@pytest.mark.parametrize("model_type", ["qwen2_moe", "qwen3_moe"])
def test_to_dense_qwen_loads_with_dense_layers_padded(model_type, tmp_path):
    src = tmp_path / "src"
    build(model_type, src)
    out = tmp_path / "out"
    result = merge(
        str(src),
        out,
        to_dense=True,
        dense_strategy="average",
        calibration=documents(),
        seq_len=16,
        device="cpu",
        evaluate=False,
        sample_tokens=256,
    )
    model, info = load_hf(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    cfg = config_of(out)
    assert cfg["model_type"] == model_type.replace("_moe", "")
    # Layer 1 is a dense layer of width 48; MoE layers are 16 (+24 shared for Qwen2-MoE): padded to 48.
    assert cfg["intermediate_size"] == 48
    assert result.written_bytes == result.predicted_bytes
    assert torch.isfinite(logits_of(model)).all()
    if model_type == "qwen2_moe":
        assert "shared_expert_gate_mean" in result.layers[0].notes


# ----------------------------------------------------------------------------- stats file, refusals, size


@pytest.fixture(scope="module")
def tiny_mixtral(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-mixtral")
    src = root / "src"
    build("mixtral", src)
    return src


def test_stats_file_in_place_of_a_dataset(tiny_mixtral, tmp_path):
    from moetool.data import iter_batches, iter_windows
    from moetool.modeling import load_model_and_tokenizer
    from moetool.routing.profile import profile_routing

    model, tokenizer, _ = load_model_and_tokenizer(str(tiny_mixtral), device="cpu")
    windows = iter_windows(tokenizer, documents(), seq_len=16)
    stats = profile_routing(model, iter_batches(windows, batch_size=4), name=str(tiny_mixtral))
    stats_path = tmp_path / "routing-stats.json"
    stats.save(stats_path)
    by_stats = merge(str(tiny_mixtral), tmp_path / "a", num_experts=2, method="frequency", stats=stats_path)
    by_data = merge(
        str(tiny_mixtral),
        tmp_path / "b",
        num_experts=2,
        method="frequency",
        calibration=documents(),
        seq_len=16,
        batch_size=4,
        device="cpu",
        evaluate=False,
    )
    assert [d.groups for d in by_stats.layers] == [d.groups for d in by_data.layers]
    assert by_stats.calibration["source"] == "stats"
    with pytest.raises(UsageError) as err:
        merge(str(tiny_mixtral), tmp_path / "c", num_experts=2, method="reap", stats=stats_path)
    assert err.value.code == "NEEDS_DATASET"
    merge(str(tiny_mixtral), tmp_path / "d", num_experts=2, method="merge-router", stats=stats_path)
    load_hf(tmp_path / "d")
    # No --method: a stats file holds no hidden states, so the default falls back to frequency.
    assert merge(str(tiny_mixtral), tmp_path / "e", num_experts=2, stats=stats_path).method == "frequency"


def test_default_method_is_search_where_it_can_run():
    from moetool.merge.api import default_method

    mixtral, llama4 = get_family("mixtral"), get_family("llama4")
    assert default_method(mixtral, mixtral.merge, have_stats=False) == "search"
    assert default_method(mixtral, mixtral.merge, have_stats=True) == "frequency"
    # Llama-4's router weight scales the expert's input: search cannot model the layer output.
    assert default_method(llama4, llama4.merge, have_stats=False) == "frequency"


def test_refusals(tiny_mixtral, tmp_path):
    docs = documents()
    with pytest.raises(UsageError) as err:
        merge(str(tiny_mixtral), tmp_path / "x", num_experts=4, calibration=docs)
    assert err.value.code == "M_OUT_OF_RANGE"
    with pytest.raises(UsageError):
        merge(str(tiny_mixtral), tmp_path / "x", num_experts=2, to_dense=True, calibration=docs)
    with pytest.raises(UsageError) as err:
        merge(str(tiny_mixtral), tmp_path / "x", num_experts=2)
    assert err.value.code == "CALIBRATION_MISSING"
    with pytest.raises(MoetoolError) as err:
        merge(str(tiny_mixtral), tiny_mixtral / "inside", num_experts=2, calibration=docs)
    assert err.value.code == "OUTPUT_OVERLAPS_INPUT"
    dense = tmp_path / "dense"
    build("mistral", dense)
    with pytest.raises(UnsupportedArchitectureError) as err:
        merge(str(dense), tmp_path / "y", num_experts=2, calibration=docs)
    assert err.value.code == "NOT_MOE"
    oss = tmp_path / "oss"
    build_tiny("gpt_oss", oss)
    with pytest.raises(UnsupportedArchitectureError) as err:
        merge(str(oss), tmp_path / "z", num_experts=2, calibration=docs)
    assert err.value.code == "FAMILY_UNSUPPORTED" and "clamped" in err.value.message
    olmoe = tmp_path / "olmoe"
    build_tiny("olmoe", olmoe)
    with pytest.raises(UnsupportedArchitectureError) as err:
        merge(str(olmoe), tmp_path / "w", to_dense=True, calibration=docs)
    assert err.value.code == "NO_DENSE_COUNTERPART"
    assert not any(p.name.startswith(("x", "y", "z", "w")) for p in tmp_path.iterdir())


def test_fewer_experts_than_top_k_lowers_top_k(tiny_mixtral, tmp_path):
    result = merge(
        str(tiny_mixtral),
        tmp_path / "one",
        num_experts=1,
        method="frequency",
        calibration=documents(),
        seq_len=16,
        device="cpu",
        evaluate=False,
    )
    assert result.top_k_after == 1 and any("top-k 2 -> 1" in a for a in result.adjustments)
    cfg = config_of(tmp_path / "one")
    assert cfg["num_local_experts"] == 1 and cfg["num_experts_per_tok"] == 1
    model, info = load_hf(tmp_path / "one")
    assert not info["missing_keys"] and torch.isfinite(logits_of(model)).all()


def test_deepseek_v3_needs_two_experts_per_group(tmp_path):
    src = tmp_path / "ds"
    build("deepseek_v3", src)
    with pytest.raises(UsageError) as err:
        merge(str(src), tmp_path / "out", num_experts=1, calibration=documents())
    assert err.value.code == "M_TOO_SMALL"


def test_sharded_output_and_determinism(tiny_mixtral, tmp_path):
    kwargs = {
        "num_experts": 3,
        "method": "merge-output",
        "calibration": documents(),
        "seq_len": 16,
        "device": "cpu",
        "evaluate": False,
        "refit_router": True,
        "sample_tokens": 256,
    }
    a = merge(str(tiny_mixtral), tmp_path / "a", max_shard_size=60_000, **kwargs)
    b = merge(str(tiny_mixtral), tmp_path / "b", **kwargs)
    assert len([f for f in a.files if f.endswith(".safetensors")]) > 1
    assert (tmp_path / "a" / "model.safetensors.index.json").exists()
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == a.predicted_bytes == b.written_bytes
    from safetensors.torch import load_file

    tensors_a = {}
    for f in a.files:
        if f.endswith(".safetensors"):
            tensors_a.update(load_file(str(tmp_path / "a" / f)))
    tensors_b = load_file(str(tmp_path / "b" / "model.safetensors"))
    assert tensors_a.keys() == tensors_b.keys()
    assert all(torch.equal(tensors_a[k], tensors_b[k]) for k in tensors_a)
    load_hf(tmp_path / "a")


def test_held_out_text_too_short_to_score_costs_the_figures_only(tiny_mixtral, tmp_path):
    """The merge is done and checked before evaluation: held-out text that tokenizes to fewer than two
    tokens gives no window to score, and the output is still published, with a warning instead of the
    figures (it used to fail the whole merge with DATASET_EMPTY)."""
    from moetool.data import Document

    result = merge_model(
        str(tiny_mixtral),
        tmp_path / "m",
        MergeOptions(num_experts=2, method="frequency", device="cpu"),
        calibration=DatasetSpec.of_documents(documents(), max_tokens=2000, seq_len=16, batch_size=4),
        eval_data=DatasetSpec.of_documents([Document(" ")], "tiny", seq_len=16),
    )
    assert result.eval is None and "no held-out text scored" in result.warnings[-1]
    load_hf(tmp_path / "m")
