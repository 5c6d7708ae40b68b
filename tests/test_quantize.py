"""End-to-end tests of moetool.quantize on tiny random models of several families.

Per-expert on-disk layouts (Mixtral, Qwen3-MoE with a dense layer, OLMoE, DeepSeek-V3 with shared
experts and a dense first layer), a fused on-disk layout (GraniteMoE), all fused ``[E, 2I, H]`` in
memory (transformers 5). Checked: every routed expert stored quantized, nothing else touched, the
written codes equal an independent round-to-nearest of the source weights, the output loads through
``moetool.load_model`` and stock ``from_pretrained`` with its experts replaced, GPTQ's calibration
coverage adds up, and coverage options do what they say.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moetool.errors import CheckpointError, ConfigError, UnsupportedArchitectureError, UsageError
from moetool.io.checkpoint import Checkpoint
from moetool.quantize import CalibrationData, CoverageOptions, QuantizeOptions, quantize
from moetool.quantize.grids import UniformGrid
from moetool.quantize.modules import QuantizedExperts, QuantizedLinear
from moetool.quantize.rtn import rtn_quantize
from tests.test_data import make_tokenizer
from tests.test_eval import corpus
from tests.tiny import build_tiny

# transformers initialises a zero-width shared expert (Qwen2-MoE without shared experts) before loading it.
pytestmark = pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "deepseek_v3", "minimax_m2"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    """Tiny checkpoints (with a word-level tokenizer) of every family tested, built once."""
    root = tmp_path_factory.mktemp("quantize-models")
    paths = {}
    for family in FAMILIES:
        path = root / family
        build_tiny(family, path)
        make_tokenizer(path=path)
        paths[family] = path
    return paths


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("quantize-data") / "calib.jsonl"
    path.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in corpus(120)))
    return path


def calibration(path: Path, tokens: int = 1024) -> CalibrationData:
    return CalibrationData(str(path), max_tokens=tokens, seq_len=32, batch_size=4)


def routed_names(folder: Path) -> list[str]:
    """The routed-expert tensors a checkpoint stores (from the registry)."""
    from moetool.arch.dims import resolve_dims
    from moetool.arch.registry import family_for_config
    from moetool.quantize.layout import build_layout

    checkpoint = Checkpoint.open(folder)
    spec = family_for_config(checkpoint.config)
    layout = build_layout(spec, resolve_dims(spec, checkpoint.config), checkpoint, ("routed_experts",))
    return sorted(n for e in layout.experts.values() for n in e.names())


@pytest.mark.parametrize("family", FAMILIES)
def test_every_routed_expert_quantized_rtn(tiny, tmp_path, family):
    source = tiny[family]
    out = tmp_path / "q"
    result = quantize(source, out, QuantizeOptions(bits=4, method="rtn", group_size=16))
    assert result.verification is not None and result.verification.routed_fraction == 1.0
    checks = [(c.name, c.passed) for c in result.verification.checks]
    assert checks == [("coverage", True), ("exact", True), ("logits", True), ("reload", True)]

    src = Checkpoint.open(source)
    dst = Checkpoint.open(out)
    experts = routed_names(source)
    assert experts
    for name in experts:
        assert name not in dst.tensors
        base = name.removesuffix(".weight")
        assert {f"{base}.qweight", f"{base}.qscale", f"{base}.qzero"} <= set(dst.tensors)
    # Everything else is copied bit for bit.
    for name, tensor in src.iter_tensors([n for n in src.tensors if n not in experts]):
        assert torch.equal(dst.read_tensor(name), tensor), name
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "moetool"
    assert result.storage["routed_experts"].quantized_params == sum(src.tensors[n].numel for n in experts)
    assert 4.0 < result.expert_bits < 6.0  # 4-bit codes plus a float16 scale and a zero point per 16


@pytest.mark.parametrize("family", ["mixtral", "granitemoe"])
def test_loaded_experts_equal_independent_rtn(tiny, tmp_path, family):
    """What the loader reconstructs equals round-to-nearest computed here from the source weights."""
    import moetool
    from moetool.modeling import load_weights, open_checkpoint

    out = tmp_path / "q"
    quantize(tiny[family], out, QuantizeOptions(bits=3, method="rtn", group_size=8), verify=False)
    original = load_weights(open_checkpoint(str(tiny[family])), device="cpu", dtype="float32")
    model = moetool.load_model(str(out), device="cpu")
    from moetool.quantize.loader import decoder_layers

    layers = decoder_layers(model)
    for index, layer in decoder_layers(original).items():
        experts = layer.get_submodule("block_sparse_moe.experts" if family == "granitemoe" else "mlp.experts")
        loaded = layers[index].get_submodule("block_sparse_moe.experts" if family == "granitemoe" else "mlp.experts")
        assert isinstance(loaded, QuantizedExperts)
        gate_up, down = loaded.dequantize()
        assert torch.equal(gate_up, rtn_quantize(experts.gate_up_proj, UniformGrid(3), 8).dequantized)
        assert torch.equal(down, rtn_quantize(experts.down_proj, UniformGrid(3), 8).dequantized)
        assert not list(loaded.parameters())  # nothing allocated in full precision
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_stock_from_pretrained_after_import(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    import moetool.quantize  # noqa: F401 - registers the quant method

    out = tmp_path / "q"
    quantize(tiny["olmoe"], out, QuantizeOptions(method="nf4", group_size=16), verify=False)
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert isinstance(model.model.layers[0].mlp.experts, QuantizedExperts)


def test_gptq_coverage_adds_up_and_beats_rtn(tiny, calib_file, tmp_path):
    result = quantize(
        tiny["mixtral"], tmp_path / "q", QuantizeOptions(bits=3, group_size=16), calibration=calibration(calib_file)
    )
    tokens = result.calibration["tokens"]
    assert tokens == 1024
    top_k = 2
    assert len(result.layers) == 3
    for layer in result.layers:
        assert layer.coverage is not None and layer.coverage.tokens == tokens
        assert sum(e.routed for e in layer.coverage.experts) == tokens * top_k  # padding never counted
        for expert in layer.coverage.experts:
            assert expert.hessian in ("routed", "all_tokens")
            assert expert.used == (expert.routed if expert.hessian == "routed" else tokens)
        for weight in ("gate_up", "down"):
            figures = layer.proxy_error[weight]
            assert figures["gptq"] < figures["rtn"], (layer.layer, weight, figures)
    assert [c.passed for c in result.verification.checks] == [True, True, True, True]


def test_coverage_options(tiny, calib_file, tmp_path):
    data = calibration(calib_file, tokens=512)
    every = quantize(
        tiny["qwen3_moe"],
        tmp_path / "all",
        QuantizeOptions(bits=4, group_size=16, coverage=CoverageOptions(all_experts=True)),
        calibration=data,
        verify=False,
    )
    for layer in every.layers:
        assert all(e.used == 512 and e.hessian == "all_tokens" for e in layer.coverage.experts)
    capped = quantize(
        tiny["qwen3_moe"],
        tmp_path / "cap",
        QuantizeOptions(
            bits=4, group_size=16, coverage=CoverageOptions(max_tokens_per_expert=100, min_tokens_per_expert=10)
        ),
        calibration=data,
        verify=False,
    )
    for layer in capped.layers:
        for e in layer.coverage.experts:
            assert e.used <= 100 or e.hessian == "all_tokens"
    assert any(e.routed > 100 for layer in capped.layers for e in layer.coverage.experts)


def test_rtn_fallback_below_minimum_equals_rtn(tiny, calib_file, tmp_path):
    """Experts below --min-tokens-per-expert with --fallback rtn get exactly round-to-nearest codes."""
    gptq = quantize(
        tiny["mixtral"],
        tmp_path / "g",
        QuantizeOptions(bits=3, group_size=16, coverage=CoverageOptions(min_tokens_per_expert=10**9, fallback="rtn")),
        calibration=calibration(calib_file, tokens=256),
        verify=False,
    )
    assert all(e.hessian == "rtn" and e.used == 0 for layer in gptq.layers for e in layer.coverage.experts)
    quantize(tiny["mixtral"], tmp_path / "r", QuantizeOptions(bits=3, method="rtn", group_size=16), verify=False)
    a, b = Checkpoint.open(tmp_path / "g"), Checkpoint.open(tmp_path / "r")
    for name in (n for n in a.tensors if n.endswith((".qweight", ".qscale", ".qzero"))):
        assert torch.equal(a.read_tensor(name), b.read_tensor(name)), name


def test_expert_batches_give_the_same_codes(tiny, calib_file, tmp_path):
    data = calibration(calib_file, tokens=512)
    opts = {"bits": 4, "group_size": 16, "act_order": True}
    quantize(tiny["olmoe"], tmp_path / "all", QuantizeOptions(**opts), calibration=data, verify=False)
    quantize(tiny["olmoe"], tmp_path / "one", QuantizeOptions(**opts, expert_batch=1), calibration=data, verify=False)
    a, b = Checkpoint.open(tmp_path / "all"), Checkpoint.open(tmp_path / "one")
    names = [n for n in a.tensors if n.endswith(".qweight")]
    assert names
    same = sum(torch.equal(a.read_tensor(n), b.read_tensor(n)) for n in names)
    # Identical up to float rounding of batched vs single matrix products (a rare code can flip).
    assert same >= 0.95 * len(names)


def test_attention_and_shared_experts_by_flag(tiny, calib_file, tmp_path):
    result = quantize(
        tiny["deepseek_v3"],
        tmp_path / "q",
        QuantizeOptions(bits=4, group_size=8, attention=True, shared_experts=True),
        calibration=calibration(calib_file, tokens=256),
    )
    storage = result.storage
    for category in ("routed_experts", "shared_experts"):
        assert storage[category].quantized_params == storage[category].params, category
    # MLA attention: every projection; its two low-rank layer norms (28 values per layer) stay.
    assert storage["attention"].params - storage["attention"].quantized_params == 3 * (12 + 16)
    for category in ("router", "embedding", "norms"):
        assert storage[category].quantized_params == 0
    assert [c.passed for c in result.verification.checks] == [True, True, True, True]
    import moetool

    model = moetool.load_model(str(tmp_path / "q"), device="cpu")
    kinds = {type(m) for m in model.modules()}
    assert QuantizedExperts in kinds and QuantizedLinear in kinds
    # The router and the shared-expert gate stay full precision.
    assert all(not isinstance(m, QuantizedLinear) for n, m in model.named_modules() if n.endswith("mlp.gate"))


def test_ternary_stream_and_nf4(tiny, tmp_path):
    ternary = quantize(tiny["mixtral"], tmp_path / "t", QuantizeOptions(ternary=True, method="rtn", group_size=0))
    names = [n for n in Checkpoint.open(tmp_path / "t").tensors if n.endswith(".qweight")]
    assert names and all(Checkpoint.open(tmp_path / "t").tensors[n].shape[0] > 0 for n in names)
    assert ternary.expert_bits < 2.5  # rows of 32 / 48: the float16 scale alone is 0.33-0.5 bit here
    nf4 = quantize(tiny["mixtral"], tmp_path / "n", QuantizeOptions(method="nf4", group_size=16))
    assert 4.0 < nf4.expert_bits < 5.5
    assert json.loads((tmp_path / "n" / "config.json").read_text())["quantization_config"]["scheme"] == "nf4"


def test_refusals(tiny, tmp_path, calib_file):
    source = tiny["mixtral"]
    with pytest.raises(UsageError):
        quantize(source, tmp_path / "a", QuantizeOptions(bits=5, method="rtn"))
    with pytest.raises(UsageError):
        quantize(source, tmp_path / "a", QuantizeOptions(bits=3, method="nf4"))
    with pytest.raises(UsageError):
        quantize(source, tmp_path / "a", QuantizeOptions(group_size=-1, method="rtn"))
    with pytest.raises(UsageError):
        quantize(source, tmp_path / "a", QuantizeOptions(bits=4))  # gptq without calibration text
    dense = tmp_path / "dense"
    build_tiny("llama", dense)
    with pytest.raises(UnsupportedArchitectureError) as info:
        quantize(dense, tmp_path / "a", QuantizeOptions(method="rtn"))
    assert info.value.code == "NOT_MOE"
    gpt_oss = tmp_path / "gpt_oss"
    build_tiny("gpt_oss", gpt_oss)
    with pytest.raises(UnsupportedArchitectureError):
        quantize(gpt_oss, tmp_path / "a", QuantizeOptions(method="rtn"))
    done = tmp_path / "done"
    quantize(source, done, QuantizeOptions(method="rtn", group_size=16), verify=False)
    with pytest.raises(CheckpointError) as info:
        quantize(done, tmp_path / "again", QuantizeOptions(method="rtn"))
    assert info.value.code == "QUANTIZED_INPUT"
    assert not (tmp_path / "a").exists() and not (tmp_path / "again").exists()


def test_damaged_quantized_checkpoints_fail_to_load(tiny, tmp_path):
    import moetool

    out = tmp_path / "q"
    quantize(tiny["mixtral"], out, QuantizeOptions(bits=4, method="rtn", group_size=16), verify=False)
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"]["group_size"] = 8  # the scales no longer fit
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as info:
        moetool.load_model(str(out), device="cpu")
    assert info.value.code == "QUANT_SHAPE_MISMATCH"
    config["quantization_config"]["format_version"] = 99
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError):
        moetool.load_model(str(out), device="cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batched_gptq_matches_cpu(tiny, calib_file, tmp_path):
    """The same pipeline on the GPU (experts of a layer batched there) gives (nearly) the CPU's codes."""
    import moetool

    data = calibration(calib_file, tokens=512)
    opts = {"bits": 4, "group_size": 16}
    quantize(tiny["mixtral"], tmp_path / "cpu", QuantizeOptions(**opts, device="cpu"), calibration=data)
    result = quantize(tiny["mixtral"], tmp_path / "cuda", QuantizeOptions(**opts, device="cuda"), calibration=data)
    assert result.device.startswith("cuda")
    a, b = Checkpoint.open(tmp_path / "cpu"), Checkpoint.open(tmp_path / "cuda")
    names = [n for n in a.tensors if n.endswith(".qweight")]
    same = sum(int((a.read_tensor(n) == b.read_tensor(n)).sum()) for n in names)
    total = sum(a.tensors[n].numel for n in names)
    assert same >= 0.98 * total  # float rounding differs between devices; a few codes may flip
    model = moetool.load_model(str(tmp_path / "cuda"), device="cuda")
    ids = torch.randint(0, 100, (2, 12), device="cuda")
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


def test_qwen2_moe_shared_expert_gate_stays_full_precision(tiny, tmp_path):
    result = quantize(
        tiny["qwen2_moe"], tmp_path / "q", QuantizeOptions(method="rtn", bits=4, group_size=8, shared_experts=True)
    )
    stored = Checkpoint.open(tmp_path / "q").tensors
    gates = [n for n in stored if n.endswith("shared_expert_gate.weight")]
    assert gates  # the [1, H] sigmoid gate is a router, not an expert: kept as it was
    assert result.storage["shared_experts"].quantized_params < result.storage["shared_experts"].params
    assert any(n.endswith("shared_expert.down_proj.qweight") for n in stored)
