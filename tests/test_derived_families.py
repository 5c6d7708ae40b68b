"""Every MoE model type of the installed transformers is supported or refused with a reason, and the
derived families count and route exactly on tiny random checkpoints built with stock transformers.

The default run checks a representative subset (:data:`FAST`: hybrid, multimodal, MLA, fused and
shared-expert layouts); ``-m slow`` checks every derived family.
"""

from __future__ import annotations

import json

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


def test_every_refusal_has_a_reason_and_switch_is_rewritten():
    """Every command a derived family's table entry refuses says why; Switch Transformers (two-matrix
    ReLU experts in an encoder and a decoder) is merged and quantized (tests/test_merge_encoder_decoder.py,
    tests/test_quantize_encdec.py), so neither refuses it."""
    from moetool.arch.registry import capability, get_family

    for entry in ENTRIES.values():
        for command in ("merge", "quantize", "upcycle", "distill"):
            assert len(entry["capabilities"][command] or "") > 20, (entry["model_type"], command)
    if "switch_transformers" not in ENTRIES:
        pytest.skip("switch_transformers is not in the derived table")
    switch = get_family("switch_transformers")
    assert capability(switch, "merge") is None and capability(switch, "quantize") is None
    assert "encoder-decoder" in capability(switch, "distill")


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
    assert len(quantizable) >= 32
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


# ----------------------------------------------------------------------------- distill


def _distillable() -> list[str]:
    from moetool.arch.derived import derived_families

    return sorted(spec.name for spec in derived_families() if "distill" not in spec.capabilities)


#: Distilled by default: a decoder-only family with dense layers first (glm4_moe) and a hybrid (jamba).
FAST_DISTILL = ["glm4_moe", "jamba"]


def test_distill_capability_is_data_with_reasons():
    """Every decoder-only derived family can be a distill teacher; encoder-decoders and DISTILL_REFUSED
    refuse with a reason; no derived family is an upcycle target."""
    from moetool.arch.derived import DISTILL_REFUSED, derived_families

    specs = {spec.name: spec for spec in derived_families()}
    distillable = _distillable()
    assert len(distillable) >= 50 and set(FAST_DISTILL) <= set(distillable)
    for name, spec in specs.items():
        if name in DISTILL_REFUSED:
            assert spec.capabilities["distill"] == DISTILL_REFUSED[name]
        elif spec.stacks:
            assert "encoder-decoder" in spec.capabilities["distill"]
        else:
            assert name in distillable
        assert "upcycle writes" in spec.capabilities["upcycle"]


@pytest.mark.parametrize("model_type", _params(_distillable(), FAST_DISTILL))
def test_distill_derived_family(model_type, tmp_path):
    """A tiny derived teacher distils into a dense checkpoint student (--init PATH) sharing its tokenizer:
    the run trains, evaluates against the teacher (finite KL) and publishes a model stock transformers
    loads. Students built from the teacher are refused before any work (no dense counterpart)."""
    import math
    import random

    from transformers import AutoModelForCausalLM

    from moetool.data import DatasetSpec, Document
    from moetool.distill import DistillOptions, distill
    from moetool.errors import MoetoolError
    from moetool.modeling import load_tokenizer, open_checkpoint
    from tests.helpers import make_tokenizer
    from tests.tiny import build_tiny

    teacher = tmp_path / "teacher"
    model = build_tiny_derived(model_type, teacher)
    # The logits' width (Inkling-2 keeps a vocab_size padded beyond the rows its head predicts).
    vocab = model.get_output_embeddings().weight.shape[0]
    words = [f"w{i}" for i in range(min(200, vocab - 10))]
    make_tokenizer(("<pad>", "<unk>", "</s>", *words), path=teacher)
    student = tmp_path / "student"
    build_tiny("llama", student, vocab_size=vocab)
    make_tokenizer(("<pad>", "<unk>", "</s>", *words), path=student)
    rng = random.Random(0)
    docs = [Document(" ".join(rng.choice(words) for _ in range(40))) for _ in range(24)]
    data = DatasetSpec.of_documents(docs[:20], "train")
    options = dict(steps=2, batch_size=2, seq_len=16, eval_max_tokens=200, save_every=2, log_every=1, threads=1)
    run = lambda out, init: distill(  # noqa: E731
        str(teacher), out, data=data, eval_data=DatasetSpec.of_documents(docs[20:], "held-out"),
        options=DistillOptions(init=init, **options), device="cpu",
    )  # fmt: skip
    with pytest.raises(MoetoolError) as info:
        run(tmp_path / "never", "concat")
    assert info.value.code == "NO_DENSE_COUNTERPART" and not (tmp_path / "never").exists()
    tokenizers = [type(load_tokenizer(open_checkpoint(str(folder)))) for folder in (teacher, student)]
    if tokenizers[0] is not tokenizers[1]:
        # transformers picks a tokenizer class from the model type (Qwen3.5's), which splits the tiny
        # word-level vocabulary differently: distill must say so rather than train on mismatched ids.
        with pytest.raises(MoetoolError) as info:
            run(tmp_path / "mismatch", str(student))
        assert info.value.code == "TOKENIZER_MISMATCH"
        return
    result = run(tmp_path / "out", str(student))
    assert result.state.step == 2 and math.isfinite(result.evaluation.kl)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert type(reloaded).__name__ == "LlamaForCausalLM"


def test_hash_routing_tables_are_not_mistaken_for_quantized_weights(tmp_path):
    """DeepSeek-V4's hash-routed layers store token -> expert tables (tid2eid) as integers: a saved
    checkpoint passes validation and profile-routing / eval run on it from disk, while an integer router
    weight is still refused."""
    from moetool.io.checkpoint import Checkpoint
    from moetool.validate.tensors import validate_checkpoint
    from tests.helpers import make_tokenizer, run_cli
    from tests.malformed import edit_header

    if "deepseek_v4" not in ENTRIES:
        pytest.skip("deepseek_v4 is not in the derived table")
    path = tmp_path / "dsv4"
    build_tiny_derived("deepseek_v4", path)
    make_tokenizer(path=path)
    checkpoint = Checkpoint.open(path)
    assert any(name.endswith("tid2eid") and info.dtype == "I64" for name, info in checkpoint.tensors.items())
    assert validate_checkpoint(checkpoint, float_weights=True) == []
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": "hello world " * 20}) + "\n" for _ in range(4)))
    result = run_cli("profile-routing", str(path), "-d", str(data), "--json", one_thread=True)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["layers"]
    router = next(name for name in checkpoint.tensors if name.endswith("gate.weight"))
    edit_header(path, lambda h: h[router].__setitem__("dtype", "I32"))
    [finding] = validate_checkpoint(Checkpoint.open(path), float_weights=True)
    assert finding.code == "DTYPE_INVALID" and router in finding.message


# ----------------------------------------------------------------------------- merge


def _mergeable() -> list[str]:
    from moetool.arch.derived import derived_families

    return sorted(spec.name for spec in derived_families() if "merge" not in spec.capabilities)


#: Merged by default: hand-named w1/w2/w3 experts (minimax), gate/up/down with dense layers first, shared
#: experts and group-limited sigmoid routing (glm4_moe); Switch and NLLB-MoE run in
#: tests/test_merge_encoder_decoder.py; the other mergeable families run with -m slow.
FAST_MERGE = ["glm4_moe", "minimax"]


def test_merge_capability_is_data_with_reasons():
    """Derived families merge where merge reads their experts and no verified failure refuses them; every
    other derived family refuses merge with a reason."""
    from moetool.arch.derived import MERGE_REFUSED, derived_families

    specs = {spec.name: spec for spec in derived_families()}
    mergeable = _mergeable()
    assert len(mergeable) >= 40
    assert {*FAST_MERGE, "switch_transformers", "nllb-moe"} <= set(mergeable)
    for name, reason in MERGE_REFUSED.items():
        if name in specs:
            assert specs[name].capabilities["merge"] == reason and len(reason) > 20
    for name, spec in specs.items():
        if name not in mergeable:
            assert len(spec.capabilities.get("merge") or "") > 20, name


def _calibration_docs(model, path, documents: int = 16):
    import random

    from moetool.data import DatasetSpec, Document
    from tests.helpers import make_tokenizer

    vocab = model.get_input_embeddings().num_embeddings
    words = [f"w{i}" for i in range(min(150, vocab - 10))]  # every token id inside the tiny vocabulary
    if not (path / "tokenizer.json").exists():
        make_tokenizer(("<pad>", "<unk>", "</s>", *words), path=path)
    rng = random.Random(0)
    docs = [Document(" ".join(rng.choice(words) for _ in range(96))) for _ in range(documents)]
    return DatasetSpec.of_documents(docs, max_tokens=512, seq_len=48, batch_size=4), words


#: Switch Transformers and NLLB-MoE (capacity-limited routers) are merged in tests/test_merge_encoder_decoder.py.
MERGE_TESTED = [t for t in _mergeable() if t in ENTRIES and t not in ("switch_transformers", "nllb-moe")]


@pytest.mark.parametrize("model_type", _params(MERGE_TESTED, FAST_MERGE))
def test_merge_derived_family_verifies(model_type, tiny_models, tmp_path):
    """Merging a tiny derived checkpoint to about half its experts (default method): the calibration's
    choices, weights and hidden states with merge's reading of the experts reproduce what the model's
    experts modules output; stock transformers loads the output (no missing, unexpected or mis-shaped
    tensor) and runs it; the config holds the new expert count; the eval pass ran."""
    import json

    import torch
    import transformers

    from moetool.arch.dims import resolve_dims
    from moetool.arch.registry import family_for_config
    from moetool.merge.api import MergeOptions, merge

    path, model = tiny_models(model_type)
    data, words = _calibration_docs(model, path)
    config = json.loads((path / "config.json").read_text())
    spec = family_for_config(config)
    dims = resolve_dims(spec, config)
    assert _experts_reproduced(model, spec, dims, path, words) < 1e-3
    n, k = int(dims.values["E"]), dims.values["K"]
    m = min(max(max(k) if isinstance(k, list) else int(k), n // 2), n - 1)
    result = merge(str(path), tmp_path / "m", MergeOptions(num_experts=m, eval_max_tokens=128), calibration=data)
    assert result.num_experts_after == m and [d.layer for d in result.layers] == sorted(dims.moe_layers)
    # (Wrappers whose tokenizer class ignores the test's word-level tokenizer.json see one token per
    # document: calibration then reads them all and nothing is left to evaluate on.)
    assert (result.eval is not None and result.eval.tokens > 0) or "no held-out text" in result.warnings[-1]
    out_config = json.loads((tmp_path / "m" / "config.json").read_text())
    assert resolve_dims(family_for_config(out_config), out_config).values["E"] == m
    cls = getattr(transformers, ENTRIES[model_type]["model_class"])
    loaded, info = cls.from_pretrained(tmp_path / "m", output_loading_info=True)
    assert not any(info.get(key) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.randint(3, len(words), (1, 10), generator=torch.Generator().manual_seed(0))
    extra = {"decoder_input_ids": ids} if getattr(loaded.config, "is_encoder_decoder", False) else {}
    with torch.no_grad():
        assert torch.isfinite(loaded.eval()(input_ids=ids, **extra).logits).all()


def _experts_reproduced(model, spec, dims, path, words) -> float:
    """The largest relative error, over the MoE layers, between what the experts modules output (summed
    over the calibration tokens) and what merge computes from the calibration sample with its canonical
    reading of the checkpoint's experts."""
    import json

    from moetool.data import Document, iter_batches, iter_windows
    from moetool.merge.api import expert_activation
    from moetool.merge.calibrate import calibrate
    from moetool.merge.combine import routed_output
    from moetool.merge.layout import LayerTensors, find_prefix
    from moetool.modeling import open_checkpoint
    from moetool.routing.observe import find_modules
    from tests.helpers import make_tokenizer

    tokenizer = make_tokenizer(("<pad>", "<unk>", "</s>", *words))
    docs = [Document(" ".join(words[(7 * i + j) % len(words)] for j in range(60))) for i in range(4)]
    batches = list(iter_batches(iter_windows(tokenizer, docs, seq_len=30, max_tokens=120), batch_size=4, pad_id=0))
    masks = [b.attention_mask.reshape(-1).bool() for b in batches]
    sums: dict = {}
    calls: dict = {}

    def hook_for(layer):
        def hook(_module, _inputs, output):
            output = output[0] if isinstance(output, tuple) else output
            index = calls[layer] = calls.get(layer, -1) + 1
            sums[layer] = sums.get(layer, 0) + output.reshape(-1, output.shape[-1])[masks[index]].sum(0)

        return hook

    modules = find_modules(model, spec, "experts" if spec.stacks else spec.experts_module)
    handles = [module.register_forward_hook(hook_for(layer)) for layer, module in modules.items()]
    try:
        cal = calibrate(model, spec, batches, sample_tokens=100_000)
    finally:
        for handle in handles:
            handle.remove()
    checkpoint = open_checkpoint(str(path))
    layout = LayerTensors(spec, dims, prefix=find_prefix(spec, checkpoint.tensors, min(dims.moe_layers), dims))
    act = expert_activation(spec.merge, json.loads((path / "config.json").read_text()))
    errors = []
    for layer, layer_cal in cal.layers.items():
        experts = layout.read_experts(checkpoint, layer, int(dims.values["E"]), layout.width(layer))
        sample = layer_cal.sample
        got = routed_output(experts, sample.x, sample.indices, sample.weights, act, scales_input=False).sum(0)
        errors.append(float((got - sums[layer].float()).norm() / (sums[layer].float().norm() + 1e-12)))
    return max(errors)
