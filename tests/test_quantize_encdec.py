"""``moetool quantize`` on encoder-decoder MoE models (Switch Transformers, NLLB-MoE): both stacks' routed
experts are quantized as per-expert linear maps (``wi``/``wo``, ``fc1``/``fc2``), GPTQ calibrates each
expert on the tokens the model dispatched to it (padding excluded), and the output is verified through
stock transformers' sequence-to-sequence class. GPTQ on tiny NLLB-MoE runs in
tests/test_derived_families.py (``-m slow``)."""

from __future__ import annotations

import json
import random

import pytest

from tests.helpers import make_tokenizer, run_cli
from tests.tiny import build_tiny_derived, derived_entries

pytestmark = pytest.mark.skipif(
    not {"switch_transformers", "nllb-moe"} <= set(derived_entries()),
    reason="the derived table lacks switch_transformers or nllb-moe",
)

ALL_PASSED = {"coverage": True, "exact": True, "logits": True, "compressed-tensors": True, "transformers": True}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random checkpoint (with a tokenizer) of each family, built once per module on first use."""
    cache: dict[str, tuple] = {}

    def get(model_type: str):
        if model_type not in cache:
            path = tmp_path_factory.mktemp(model_type.replace("-", "_"))
            model = build_tiny_derived(model_type, path)
            vocab = model.get_input_embeddings().num_embeddings
            words = [f"w{i}" for i in range(min(200, vocab - 10))]
            make_tokenizer(("<pad>", "<unk>", "</s>", *words), path=path)
            cache[model_type] = (path, words)
        return cache[model_type]

    return get


def _calibration(words: list[str], max_tokens: int):
    from moetool.data import DatasetSpec, Document

    rng = random.Random(0)
    docs = [Document(" ".join(rng.choice(words) for _ in range(120))) for _ in range(24)]
    return DatasetSpec.of_documents(docs, max_tokens=max_tokens, seq_len=64, batch_size=4)


def _checks(result) -> dict:
    return {check["name"]: check["passed"] for check in result["verification"]["checks"]}


def test_layout_numbers_layers_across_stacks(tiny):
    """The experts of the decoder's layer 1 are layer 7 (6 encoder layers first), named with the
    decoder's prefix and module; each expert's up then down projection, as linear maps."""
    from moetool.arch.dims import resolve_dims
    from moetool.arch.registry import family_for_config
    from moetool.io.checkpoint import Checkpoint
    from moetool.quantize.layout import build_layout, layer_of_path

    path, _ = tiny("switch_transformers")
    checkpoint = Checkpoint.open(path)
    spec = family_for_config(checkpoint.config)
    dims = resolve_dims(spec, checkpoint.config)
    layout = build_layout(spec, dims, checkpoint, ("routed_experts",))
    assert layout.layers == [1, 3, 5, 7, 9, 11]
    assert not layout.experts
    first = layout.linears[7][:2]
    assert [(lin.name, lin.module, lin.expert, lin.role) for lin in first] == [
        ("decoder.block.1.layer.2.mlp.experts.expert_0.wi.weight", "layer.2.mlp.experts.expert_0.wi", 0, "up"),
        ("decoder.block.1.layer.2.mlp.experts.expert_0.wo.weight", "layer.2.mlp.experts.expert_0.wo", 0, "down"),
    ]
    assert layout.linears[1][0].name == "encoder.block.1.layer.1.mlp.experts.expert_0.wi.weight"
    assert {lin.category for group in layout.linears.values() for lin in group} == {"routed_experts"}
    assert len(layout.routed_names()) == 6 * 4 * 2
    assert layer_of_path(spec, dims, "encoder.block.3") == 3
    assert layer_of_path(spec, dims, "decoder.block.3") == 9
    assert layer_of_path(spec, dims, "decoder.final_layer_norm") == -1


def test_padding_flags_match_rows_exactly():
    import torch

    from moetool.quantize.linear_experts import padding_flags

    x = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    padding = x[[4, 5]]
    rows = x[[5, 0, 4, 2]]
    assert padding_flags(rows, padding).tolist() == [True, False, True, False]
    assert padding_flags(rows, None).tolist() == [False] * 4


def test_switch_gptq_quantizes_both_stacks_and_verifies(tiny, tmp_path):
    """GPTQ 4-bit (per-row groups: compressed-tensors) of a tiny Switch Transformers: every expert of the
    encoder and the decoder stored packed, all checks pass (stock AutoModelForSeq2SeqLM reloads it with
    the same logits), and each MoE layer's Hessians hold exactly the real calibration tokens: 1000 tokens
    in windows of 64 leave a padded window, and no token is dropped (capacity 64 per sequence of 64)."""
    from safetensors import safe_open

    from moetool.quantize.api import QuantizeOptions, quantize

    path, words = tiny("switch_transformers")
    out = tmp_path / "q"
    result = quantize(
        str(path),
        out,
        QuantizeOptions(method="gptq", bits=4, group_size=0),
        calibration=_calibration(words, max_tokens=1000),
    ).to_json()
    assert _checks(result) == ALL_PASSED
    assert result["format"]["name"] == "compressed-tensors"
    assert result["calibration"]["tokens"] == 1000
    assert [layer["layer"] for layer in result["coverage"]] == [1, 3, 5, 7, 9, 11]
    for layer in result["coverage"]:
        assert layer["tokens"] == 1000, layer
        assert sum(expert["routed"] for expert in layer["experts"]) == 1000, layer
    assert {key for layer in result["layers"] for key in layer["proxy_error"]} == {"up", "down"}
    with safe_open(str(out / "model.safetensors"), "pt") as handle:
        names = set(handle.keys())
    for stack, block in (("encoder", 1), ("decoder", 2)):
        for layer in (1, 3, 5):
            for expert in range(4):
                for proj in ("wi", "wo"):
                    base = f"{stack}.block.{layer}.layer.{block}.mlp.experts.expert_{expert}.{proj}"
                    assert f"{base}.weight_packed" in names and f"{base}.weight" not in names, base
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert not any(".experts." in name for name in ignore)
    # moetool's loader (eval, profile-routing) loads it through transformers too, decompressed at load.
    from moetool.modeling import load_model

    model = load_model(str(out), device="cpu")
    assert type(model).__name__ == "SwitchTransformersForConditionalGeneration"
    assert type(model.decoder.block[1].layer[2].mlp.experts.expert_0.wi).__name__ == "Linear"


def test_cli_json_nllb_rtn(tiny, tmp_path):
    """The CLI on NLLB-MoE (fc1/fc2 experts with biases, both stacks), round to nearest, --json."""
    path, _ = tiny("nllb-moe")
    out = tmp_path / "q"
    proc = run_cli("quantize", str(path), "-o", str(out), "--method", "rtn", "--group-size", "0", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["family"] == "nllb-moe"
    assert result["format"]["name"] == "compressed-tensors"
    assert _checks(result) == ALL_PASSED
    assert result["bits_per_param"]["routed_experts"]["quantized_params"] > 0
    assert sorted({layer["layer"] for layer in result["layers"]}) == [3, 9]
    # The biases stay in full precision beside the packed weights.
    from moetool.io.checkpoint import Checkpoint

    written = Checkpoint.open(out)
    assert "model.decoder.layers.3.ffn.experts.expert_0.fc1.bias" in written.tensors
    assert "model.decoder.layers.3.ffn.experts.expert_0.fc1.weight_packed" in written.tensors


def test_other_two_matrix_families_still_refuse_quantize():
    """Only the encoder-decoders were lifted: NemotronH's two-matrix experts keep the table's refusal."""
    from moetool.arch.registry import family_for_config, require_capability
    from moetool.errors import UnsupportedArchitectureError

    if "nemotron_h" not in derived_entries():
        pytest.skip("nemotron_h is not in the derived table")
    with pytest.raises(UnsupportedArchitectureError) as info:
        require_capability(family_for_config({"model_type": "nemotron_h"}), "quantize")
    assert info.value.code == "FAMILY_UNSUPPORTED"


def test_switch_rtn_in_moetools_format_reloads(tiny, tmp_path):
    """Where compressed-tensors does not fit (group size 128 does not divide the tiny widths), moetool's
    own format: its loader's quantized linears give the experts' forward the ``.weight`` it reads."""
    from moetool.quantize.api import QuantizeOptions, quantize

    path, _ = tiny("switch_transformers")
    result = quantize(str(path), tmp_path / "q", QuantizeOptions(method="rtn", bits=4)).to_json()
    assert result["format"]["name"] == "moetool"
    assert _checks(result) == {"coverage": True, "exact": True, "logits": True, "reload": True}
