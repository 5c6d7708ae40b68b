"""Every MoE model type of the installed transformers is supported or refused with a reason, and the
derived families count and route exactly on tiny random checkpoints built with stock transformers.

The default run checks a representative subset (:data:`FAST`: hybrid, multimodal, MLA, fused and
shared-expert layouts); ``-m slow`` checks every derived family.
"""

from __future__ import annotations

import pytest

from moetool.arch.derived import load_table, refused_model_types
from tests.tiny import build_tiny_derived, derived_entries, stored_numel

ENTRIES = derived_entries()
DERIVED = sorted(ENTRIES)
#: Counted by default: one family per structural feature; the others run with -m slow.
FAST = [
    t
    for t in (
        "glm4_moe",  # dense layers first (first_k_dense_replace), shared experts, sigmoid routing
        "qwen3_5_moe",  # multimodal wrapper (vision tower), hybrid linear attention
        "jamba",  # Mamba layers, experts every other layer
        "ernie4_5_moe",  # per-layer interval schedule
        "deepseek_v32",  # MLA with an indexer
        "nemotron_h",  # hybrid pattern string: Mamba, attention, dense and MoE layers
        "gemma4",  # MoE block beside a dense MLP, fused experts, wrapper
        "switch_transformers",  # encoder-decoder, two stacks
    )
    if t in ENTRIES
]
#: Routed by default (the perturbation check runs a forward per expert: few experts).
FAST_ROUTING = [t for t in ("jamba", "nemotron_h", "gemma4", "switch_transformers") if t in ENTRIES]


def _params(types: list[str], fast: list[str] = FAST) -> list:
    return [pytest.param(t, marks=() if t in fast else pytest.mark.slow) for t in types]


# ----------------------------------------------------------------------------- coverage


def test_table_is_for_the_installed_transformers():
    import transformers

    assert load_table()["transformers"] == transformers.__version__, (
        "the derived family table was generated with another transformers: run python -m moetool.arch.derive"
    )


#: MoE checkpoint types of transformers 5.25 supported today (85 of 93; the issue's target is 90%):
#: a floor, so that a regression in the generator or the registry fails here.
MIN_SUPPORTED = 85


def test_every_moe_model_type_is_supported_or_refused():
    """A new transformers release with a new MoE family fails here instead of passing silently."""
    from moetool.arch.derive.enumerate import moe_model_types
    from moetool.arch.registry import supported_model_types

    found = moe_model_types()
    supported = set(supported_model_types())
    refused = refused_model_types()
    unaccounted = sorted(t for t in found if t not in supported and t not in refused)
    assert not unaccounted, f"MoE model types neither supported nor refused: {unaccounted}"
    for model_type, reason in refused.items():
        assert len(reason) > 20, f"{model_type}: refusal without a real reason: {reason!r}"
    checkpoint_types = [t for t, is_checkpoint in found.items() if is_checkpoint]
    covered = [t for t in checkpoint_types if t in supported]
    assert len(covered) >= MIN_SUPPORTED, (
        f"{len(covered)} of {len(checkpoint_types)} MoE checkpoint types supported; refused: "
        + ", ".join(sorted(t for t in checkpoint_types if t not in supported))
    )


def test_refused_type_says_why():
    from moetool.arch.registry import family_for_config
    from moetool.errors import UnsupportedArchitectureError

    refused = refused_model_types()
    if not refused:
        pytest.skip("nothing refused")
    model_type, reason = next(iter(refused.items()))
    with pytest.raises(UnsupportedArchitectureError) as info:
        family_for_config({"model_type": model_type})
    assert reason in info.value.message


# ----------------------------------------------------------------------------- tiny checkpoints


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    """Each derived family's tiny checkpoint, built once per module on first use."""
    cache: dict[str, tuple] = {}

    def get(model_type: str):
        if model_type not in cache:
            path = tmp_path_factory.mktemp(model_type)
            model = build_tiny_derived(model_type, path)
            cache[model_type] = (path, model)
        return cache[model_type]

    return get


def _experts_params(model, spec) -> dict[int, int]:
    """Parameters of the modules transformers routes tokens to, per layer (no moetool templates)."""
    from moetool.routing.observe import find_modules

    return {
        layer: sum(p.numel() for p in module.parameters())
        for layer, module in find_modules(model, spec, "experts" if spec.stacks else spec.experts_module).items()
    }


@pytest.mark.parametrize("model_type", _params(DERIVED))
def test_header_config_and_model_agree(tiny_models, model_type):
    from moetool.arch.registry import family_for_config
    from moetool.count.params import count_from_checkpoint, count_from_config
    from moetool.io.checkpoint import Checkpoint

    path, model = tiny_models(model_type)
    checkpoint = Checkpoint.open(path)
    from_headers = count_from_checkpoint(checkpoint)
    from_config = count_from_config(checkpoint.config)
    assert from_headers.family == model_type
    # What transformers stored: its safetensors files, read without moetool. Equal to the model's own
    # parameters and persistent buffers, except where save_pretrained pads a tensor (Inkling-2 pads
    # its embedding rows to a multiple of 1024 on save).
    assert from_headers.total_params == _numel_on_disk(path) == from_config.total_params
    assert stored_numel(model) == _numel_on_disk(path) or model_type in PADDED_ON_SAVE
    for category, count in from_headers.categories.items():
        assert count.total == from_config.categories[category].total, category
        assert count.active == from_config.categories[category].active, category
    assert [layer.to_dict() for layer in from_headers.layers] == [layer.to_dict() for layer in from_config.layers]
    assert not any("heuristics" in w for w in from_headers.warnings), from_headers.warnings
    assert not any("experts, config says" in w for w in from_headers.warnings), from_headers.warnings

    # Routed experts = the parameters of the modules transformers routes tokens to, layer by layer;
    # active = everything else + top-k / num_experts of them.
    spec = family_for_config(checkpoint.config)
    routed = _experts_params(model, spec)
    counted = {
        layer.index: layer.categories["routed_experts"].total for layer in from_headers.layers if layer.kind == "moe"
    }
    assert counted == routed
    expected_active = from_headers.total_params - sum(routed.values())
    for layer in from_headers.layers:
        if layer.kind == "moe":
            expected_active += routed[layer.index] * layer.top_k // layer.num_experts
    assert from_headers.active_params == expected_active


#: Families whose save_pretrained pads a tensor beyond the in-memory model (vocabulary rows).
PADDED_ON_SAVE = {"inkling2", "inkling2_text"}


def _numel_on_disk(path) -> int:
    import math

    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())  # noqa: SIM118
    return total


def _ground_truth_counts(model, spec, batch, num_experts: int, layers: list[int] | None = None) -> dict[int, list[int]]:
    """Tokens per expert, per layer, found by perturbing each expert's weights and seeing which tokens'
    experts-module outputs change (no router hooks, no routing rule).

    An expert's weights are the slice ``[e]`` of the experts module's parameters stacked over the
    experts (fused layouts), or the parameters of its ``e``-th / ``expert_e`` submodule.
    """
    import re

    import torch

    from moetool.routing.observe import decoder_inputs, find_modules

    experts = find_modules(model, spec, "experts" if spec.stacks else spec.experts_module)
    mask = batch.attention_mask.reshape(-1).bool()
    extra = decoder_inputs(model, batch.input_ids, batch.attention_mask)

    class Stop(Exception):
        pass

    def output_of(layer: int):
        captured = {}

        def hook(_m, _a, out):
            captured["out"] = (out[0] if isinstance(out, tuple) else out).detach().clone()
            raise Stop

        handle = experts[layer].register_forward_hook(hook)
        try:
            with torch.no_grad():
                model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **extra)
        except Stop:
            pass
        finally:
            handle.remove()
        return captured["out"].reshape(mask.shape[0], -1)

    def expert_params(module, expert: int):
        own = re.compile(rf"(?:^|\.)(?:expert_)?{expert}\.")
        for name, param in module.named_parameters():
            if own.search(name):
                yield param, None
            elif (
                not re.search(r"(?:^|\.)(?:expert_)?\d+\.", name) and param.dim() >= 1 and param.shape[0] == num_experts
            ):
                yield param, expert

    counts = {}
    for layer in sorted(experts) if layers is None else layers:
        module = experts[layer]
        base = output_of(layer)
        per_expert = []
        for expert in range(num_experts):
            touched = list(expert_params(module, expert))
            with torch.no_grad():
                for param, index in touched:
                    (param if index is None else param[index]).add_(1.0)
                # Relative: repeated forwards of large activations differ in the last bits.
                scale = base.abs().amax(dim=-1) + 1e-3
                changed = (output_of(layer) - base).abs().amax(dim=-1) > 1e-3 * scale
                for param, index in touched:
                    (param if index is None else param[index]).sub_(1.0)
            per_expert.append(int((changed & mask).sum()))
        counts[layer] = per_expert
    return counts


def _batch(seed: int, length: int, pad: int):
    """Two rows of token ids, the last right-padded; ids above the tiny configs' special tokens (a
    padding id embeds to zeros, and a zero hidden state gives every expert the same output)."""
    import torch

    from tests.test_routing import FakeBatch

    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(16, 128, (2, length), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[-1, length - pad :] = 0
    return FakeBatch(input_ids, mask, [None, None])


@pytest.mark.parametrize("model_type", _params(DERIVED, FAST_ROUTING))
def test_profile_counts_equal_the_models_choices(tiny_models, model_type):
    from moetool.arch.dims import resolve_dims
    from moetool.arch.registry import family_for_config
    from moetool.routing.observe import find_modules
    from moetool.routing.profile import profile_routing

    _, model = tiny_models(model_type)
    spec = family_for_config(model.config.to_dict())
    batch = _batch(3, 9, 3)
    stats = profile_routing(model, [batch], name=model_type)
    routers = [layer.layer for layer in stats.layers]
    assert routers == sorted(find_modules(model, spec, "experts" if spec.stacks else spec.experts_module))
    # The perturbation check runs a forward per expert: the first MoE layer of each stack suffices.
    starts = resolve_dims(spec, model.config.to_dict()).stack_starts
    checked = sorted({min(r for r in routers if r >= s) for s in starts if any(r >= s for r in routers)})
    num_experts = int(resolve_dims(spec, model.config.to_dict()).values["E"])
    if model_type == "nllb-moe":  # its experts module ignores the routing (see _dispatch_counts)
        expected = _dispatch_counts(model, spec, batch, num_experts)
    else:
        expected = _ground_truth_counts(model, spec, batch, num_experts, checked)
    tokens = int(batch.attention_mask.sum())
    for layer in stats.layers:
        assert sum(layer.counts) == tokens * layer.top_k
        if layer.layer not in expected:
            continue
        # Capacity-limited models (Switch, NLLB-MoE) process only the assignments within capacity;
        # zero-compute slots past the experts (LongCat-Flash) have no weights to perturb.
        processed = layer.model_kept if layer.model_kept is not None else layer.counts
        assert processed[:num_experts] == expected[layer.layer], layer.layer


# ----------------------------------------------------------------------------- capacity drops

# Capacities small enough that the tiny batch overflows them: Switch Transformers' per-sequence
# expert_capacity (tokens), NLLB-MoE's eval capacity as a fraction of the batch's tokens.
CAPACITY = [
    pytest.param("switch_transformers", {"expert_capacity": 2}, id="switch_transformers"),
    pytest.param("nllb-moe", {"moe_eval_capacity_token_fraction": 0.15}, id="nllb-moe"),
]


def _dispatch_counts(model, spec, batch, num_experts: int) -> dict[int, list[int]]:
    """NLLB-MoE: per expert, the real tokens its router gives a non-zero combine weight after the
    capacity drop (``router_probs``, second output of the router).

    Not the perturbation check: transformers 5.25's ``NllbMoeExperts.forward`` one-hot encodes the
    ``[tokens, experts]`` dispatch mask it receives as if it held expert indices, so the expert
    modules it runs are not the routed ones (experts 0 and 1 get every kept assignment).
    """
    import torch

    from moetool.routing.observe import decoder_inputs, find_modules

    routers = find_modules(model, spec, "router")
    captured = {}
    handles = [
        module.register_forward_hook(lambda _m, _a, out, layer=layer: captured.__setitem__(layer, out[1]))
        for layer, module in routers.items()
    ]
    extra = decoder_inputs(model, batch.input_ids, batch.attention_mask)
    with torch.no_grad():
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False, **extra)
    for handle in handles:
        handle.remove()
    mask = batch.attention_mask.reshape(-1).bool()
    return {
        layer: ((weights.reshape(-1, num_experts)[mask] > 0).sum(dim=0)).tolist() for layer, weights in captured.items()
    }


@pytest.mark.parametrize(("model_type", "overrides"), CAPACITY)
def test_capacity_drops_equal_what_the_model_drops(model_type, overrides, tmp_path):
    from moetool.arch.dims import resolve_dims
    from moetool.arch.registry import family_for_config
    from moetool.routing.profile import profile_routing
    from moetool.runner.open import open_runner

    if model_type not in ENTRIES:
        pytest.skip(f"{model_type} is not in the derived table")
    model = build_tiny_derived(model_type, tmp_path, **overrides)
    spec = family_for_config(model.config.to_dict())
    batch = _batch(5, 12, 4)
    stats = profile_routing(model, [batch], name=model_type)
    num_experts = int(resolve_dims(spec, model.config.to_dict()).values["E"])
    if model_type == "nllb-moe":
        expected = _dispatch_counts(model, spec, batch, num_experts)
    else:
        expected = _ground_truth_counts(model, spec, batch, num_experts)
    tokens = int(batch.attention_mask.sum())
    assert stats.capacity is not None and stats.capacity["top_k"] == stats.top_k
    dropped_somewhere = False
    for layer in stats.layers:
        assert layer.model_kept == expected[layer.layer], layer.layer
        assert sum(layer.counts) == tokens * layer.top_k  # the router's choices, before the drop
        assert layer.model_dropped == pytest.approx(1 - sum(layer.model_kept) / (tokens * layer.top_k))
        dropped_somewhere |= layer.model_dropped > 0
    assert dropped_somewhere, "the capacity was meant to overflow on this batch"
    doc = stats.to_json()
    assert "capacity" in doc and "model_dropped" in doc["layers"][0]
    # The layer-streamed runner (profile-routing's default path) sees the same drops.
    opened = open_runner(str(tmp_path), device="cpu", dtype="float32", tokenizer=False)
    assert opened.streamed
    streamed = profile_routing(opened.runner, [batch], name=model_type)
    assert [layer.model_kept for layer in streamed.layers] == [layer.model_kept for layer in stats.layers]
    assert [layer.counts for layer in streamed.layers] == [layer.counts for layer in stats.layers]


# ----------------------------------------------------------------------------- capabilities


def test_weight_rewriting_commands_refuse_with_a_reason(tiny_models):
    """merge and quantize refuse a family they cannot rewrite, at their start, with the registry's
    reason (Switch Transformers: two-matrix ReLU experts in an encoder and a decoder)."""
    from moetool.data import DatasetSpec, Document
    from moetool.errors import UnsupportedArchitectureError
    from moetool.merge.api import MergeOptions, merge
    from moetool.quantize.api import QuantizeOptions, quantize

    for entry in ENTRIES.values():
        for command in ("merge", "quantize", "upcycle", "distill"):
            assert len(entry["capabilities"][command] or "") > 20, (entry["model_type"], command)
    if "switch_transformers" not in ENTRIES:
        pytest.skip("switch_transformers is not in the derived table")
    path, _ = tiny_models("switch_transformers")
    out = path.parent / "never-written"
    for run in (
        lambda: merge(
            str(path),
            out,
            MergeOptions(num_experts=2, evaluate=False),
            calibration=DatasetSpec.of_documents([Document("some text to calibrate on")]),
        ),
        lambda: quantize(str(path), out, QuantizeOptions(method="rtn")),
    ):
        with pytest.raises(UnsupportedArchitectureError) as info:
            run()
        assert info.value.code == "FAMILY_UNSUPPORTED"
        assert "wi/wo" in info.value.message
    assert not out.exists()


@pytest.mark.slow
@pytest.mark.parametrize("model_type", [t for t in ("glm4_moe", "jamba", "switch_transformers") if t in ENTRIES])
def test_table_entry_regenerates(model_type):
    """The committed entry is what the generator writes today (python -m moetool.arch.derive)."""
    from moetool.arch.derive.generate import derive

    assert derive(model_type) == ENTRIES[model_type]


def test_layer_conditions_read_legacy_layer_type_names():
    """config.json files on the Hub keep older names transformers renames on load (Granite-4 hybrid's
    ``layers_block_type`` of ``mamba``/``attention``): conditions fitted on the new names still apply."""
    from moetool.arch.layers import select_layers

    legacy = {"layers_block_type": ["mamba", "attention", "mamba"]}
    assert select_layers("in:layer_types:linear_attention", legacy, 3) == [True, False, True]
    assert select_layers("in:layer_types:full_attention??all", legacy, 3) == [False, True, False]
    assert select_layers("in:layer_types:full_attention??all", {}, 3) == [True, True, True]


def test_validation_reads_configs_as_transformers_writes_them():
    """transformers writes inf as {"__float__": "Infinity"} (Mamba families' time_step_limit); the
    config check decodes it as from_pretrained does instead of refusing the checkpoint."""
    import json

    from transformers import GraniteMoeHybridConfig

    from moetool.validate.transformers_config import transformers_config_findings

    # What save_pretrained writes into config.json.
    config = json.loads(GraniteMoeHybridConfig(num_hidden_layers=2).to_json_string())
    assert {"__float__": "Infinity"} in config["time_step_limit"]
    assert transformers_config_findings(config) == []


def test_streamed_runner_routes_a_multimodal_wrapper_like_the_whole_model(tiny_models):
    """The layer-streamed runner builds a wrapper as the class the registry recorded (Qwen3.5-MoE's
    image-text-to-text class, whose text model holds the routers) and sees the same choices."""
    from moetool.routing.profile import profile_routing
    from moetool.runner.open import open_runner

    if "qwen3_5_moe" not in ENTRIES:
        pytest.skip("qwen3_5_moe is not in the derived table")
    path, model = tiny_models("qwen3_5_moe")
    batch = _batch(3, 9, 3)
    whole = profile_routing(model, [batch], name="qwen3_5_moe")
    opened = open_runner(str(path), device="cpu", dtype="float32", tokenizer=False)
    assert opened.streamed and type(opened.model).__name__ == ENTRIES["qwen3_5_moe"]["model_class"]
    streamed = profile_routing(opened.runner, [batch], name="qwen3_5_moe")
    assert [layer.counts for layer in streamed.layers] == [layer.counts for layer in whole.layers]


# ----------------------------------------------------------------------------- quantize


def _quantizable() -> list[str]:
    from moetool.arch.derived import derived_families

    return sorted(spec.name for spec in derived_families() if "quantize" not in spec.capabilities)


#: Quantized by default: hand-named w1/w2/w3 experts (minimax), gate/up/down with dense layers first and
#: shared experts (glm4_moe); the other quantizable families run with -m slow.
FAST_QUANTIZE = ["glm4_moe", "minimax"]


def test_quantize_capability_is_data_with_reasons():
    """Derived families quantize where their experts are per-expert gate/up/down projections of a text
    model; every other derived family refuses quantize with a reason."""
    from moetool.arch.derived import QUANTIZE_REFUSED, derived_families

    specs = {spec.name: spec for spec in derived_families()}
    quantizable = _quantizable()
    assert len(quantizable) >= 30
    assert set(FAST_QUANTIZE) <= set(quantizable)
    for name in QUANTIZE_REFUSED:
        if name in specs:
            assert specs[name].capabilities["quantize"] == QUANTIZE_REFUSED[name]
    for name, spec in specs.items():
        if name not in quantizable:
            assert len(spec.capabilities.get("quantize") or "") > 20, name
    assert "multimodal wrapper" in specs["qwen3_5_moe"].capabilities["quantize"]


@pytest.mark.parametrize("model_type", _params(_quantizable(), FAST_QUANTIZE))
def test_quantize_derived_family_verifies(model_type, tiny_models, tmp_path):
    """GPTQ 4-bit of a tiny derived checkpoint: every routed expert quantized, the codes decode back
    exactly, compressed-tensors decompresses them, and stock transformers reloads the output with the
    quantized model's logits (quantize's own verification, all checks passing)."""
    import random

    from moetool.data import DatasetSpec, Document
    from moetool.quantize.api import QuantizeOptions, quantize
    from tests.helpers import make_tokenizer

    path, model = tiny_models(model_type)
    vocab = model.get_input_embeddings().num_embeddings
    words = [f"w{i}" for i in range(min(200, vocab - 10))]  # every token id inside the tiny vocabulary
    if not (path / "tokenizer.json").exists():
        make_tokenizer(("<pad>", "<unk>", "</s>", *words), path=path)
    rng = random.Random(0)
    docs = [Document(" ".join(rng.choice(words) for _ in range(120))) for _ in range(24)]
    result = quantize(
        str(path),
        tmp_path / "q",
        QuantizeOptions(method="gptq", bits=4, group_size=0),
        calibration=DatasetSpec.of_documents(docs, max_tokens=1024, seq_len=64, batch_size=4),
    )
    checks = {check["name"]: check["passed"] for check in result.to_json()["verification"]["checks"]}
    assert checks == {"coverage": True, "exact": True, "logits": True, "compressed-tensors": True, "transformers": True}
