"""``moetool merge`` on the encoder-decoder MoE families: Switch Transformers (two-matrix ReLU experts
``wi``/``wo``, top-1 routing with an expert capacity) and NLLB-MoE (``fc1``/``fc2`` with biases, top-2
routing with capacity). Both stacks' MoE layers are reduced; stock transformers loads the output with
its seq2seq class, the config holds the new expert count, and the router rows and experts are the
source's kept ones (or their averages)."""

from __future__ import annotations

import json
import random

import pytest

from tests.tiny import derived_entries

ENTRIES = derived_entries()
pytestmark = pytest.mark.skipif(
    not {"switch_transformers", "nllb-moe"} <= set(ENTRIES), reason="the derived table lacks Switch or NLLB-MoE"
)
WORDS = [f"w{i}" for i in range(150)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random checkpoint with a word-level tokenizer, per family, built once (NLLB-MoE's biases
    are made non-zero so that merging them is checked)."""
    import torch

    from tests.helpers import make_tokenizer
    from tests.tiny import build_tiny_derived

    cache = {}

    def get(model_type: str, **overrides):
        key = (model_type, tuple(sorted(overrides.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(model_type)
            model = build_tiny_derived(model_type, **overrides)
            with torch.no_grad():
                for name, param in model.named_parameters():
                    if name.endswith("bias"):
                        param.copy_(0.1 * torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))))
            model.save_pretrained(path)
            make_tokenizer(("<pad>", "</s>", "<unk>", *WORDS), path=path)
            cache[key] = path
        return cache[key]

    return get


def _data(documents: int = 16, max_tokens: int = 768):
    from moetool.data import DatasetSpec, Document

    rng = random.Random(0)
    docs = [Document(" ".join(rng.choice(WORDS) for _ in range(96))) for _ in range(documents)]
    return DatasetSpec.of_documents(docs, max_tokens=max_tokens, seq_len=48, batch_size=4)


def _tensors(path):
    from safetensors.torch import load_file

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(file)))
    return out


@pytest.mark.parametrize(
    ("model_type", "method"),
    [
        ("switch_transformers", None),
        ("nllb-moe", "reap"),
        pytest.param("nllb-moe", "merge-output", marks=pytest.mark.slow),
    ],
)
def test_merge_encoder_decoder_loads_and_runs(tiny, tmp_path, model_type, method):
    import torch
    import transformers

    from moetool.arch.registry import family_for_config
    from moetool.merge.api import MergeOptions, merge

    source = tiny(model_type)
    out = tmp_path / "merged"
    result = merge(
        str(source),
        out,
        MergeOptions(num_experts=2, method=method, eval_max_tokens=256, device="cpu"),
        calibration=_data(),
    )
    config = json.loads((out / "config.json").read_text())
    spec = family_for_config(config)
    assert config["num_experts"] == 2 and result.num_experts_after == 2
    # Switch has no search: its capacity drop is not modelled, so the default falls back to frequency.
    assert result.method == (method or "frequency")
    # Both stacks' MoE layers, numbered across them as inspect does (encoder first).
    from moetool.arch.dims import resolve_dims

    dims = resolve_dims(spec, config)
    layers = [d.layer for d in result.layers]
    assert layers == sorted(dims.moe_layers)
    assert {dims.stack_of(layer)[0] for layer in layers} == {0, 1}
    # The eval pass ran both models on held-out text.
    assert result.eval is not None and result.eval.tokens > 0 and result.eval.kl > -1e-6

    before, after = _tensors(source), _tensors(out)
    from moetool.merge.layout import LayerTensors

    src_layout = LayerTensors(family_for_config(json.loads((source / "config.json").read_text())), dims)
    for decision in result.layers:
        router = src_layout.router_names(decision.layer)[0]
        rows = [
            sum(w * before[router][e] for e, w in zip(group, weights, strict=True))
            for group, weights in zip(decision.groups, decision.weights, strict=True)
        ]
        assert torch.allclose(after[router], torch.stack(rows), atol=1e-6)
        if method != "merge-output":  # pruned: the kept experts' tensors, biases included, unchanged
            kept = [group[0] for group in decision.groups]
            old = src_layout.expert_names(decision.layer, 4)
            new = src_layout.expert_names(decision.layer, 2)
            for j, e in enumerate(kept):
                for name in new:
                    if f"expert_{j}." in name:
                        assert torch.equal(after[name], before[name.replace(f"expert_{j}.", f"expert_{e}.")])
            assert any(name.endswith("bias") for name in old) == (model_type == "nllb-moe")

    model = getattr(transformers, spec.architectures[0]).from_pretrained(out).eval()
    ids = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(input_ids=ids, decoder_input_ids=ids).logits
    assert logits.shape == (2, 12, config["vocab_size"]) and torch.isfinite(logits).all()


def test_switch_calibration_reproduces_the_layer_output(tiny):
    """The calibration's hidden states, choices and weights (0 for a choice the capacity dropped), with
    the canonical two-matrix experts, give exactly what the model's experts module added, summed over
    the tokens of each MoE layer (encoder and decoder)."""
    import torch
    import transformers

    from moetool.arch.dims import resolve_dims
    from moetool.arch.registry import family_for_config
    from moetool.data import iter_batches, iter_windows
    from moetool.merge.calibrate import calibrate
    from moetool.merge.combine import routed_output
    from moetool.merge.ffn import activation
    from moetool.merge.layout import LayerTensors
    from moetool.modeling import open_checkpoint
    from moetool.routing.observe import find_modules
    from tests.helpers import make_tokenizer

    path = tiny("switch_transformers", expert_capacity=3)
    config = json.loads((path / "config.json").read_text())
    spec = family_for_config(config)
    dims = resolve_dims(spec, config)
    model = getattr(transformers, spec.architectures[0]).from_pretrained(path).eval()
    tokenizer = make_tokenizer(("<pad>", "</s>", "<unk>", *WORDS))
    windows = iter_windows(tokenizer, _data(documents=4).load(), seq_len=40, max_tokens=160)
    batches = list(iter_batches(windows, batch_size=4, pad_id=0))
    masks = [b.attention_mask.reshape(-1).bool() for b in batches]
    sums: dict[int, torch.Tensor] = {}
    calls: dict[int, int] = {}

    def hook_for(layer):
        def hook(_module, _inputs, output):
            index = calls[layer] = calls.get(layer, -1) + 1
            sums[layer] = sums.get(layer, 0) + output.reshape(-1, output.shape[-1])[masks[index]].sum(0)

        return hook

    experts_modules = find_modules(model, spec, "experts")
    handles = [module.register_forward_hook(hook_for(layer)) for layer, module in experts_modules.items()]
    try:
        cal = calibrate(model, spec, batches, sample_tokens=10_000)
    finally:
        for handle in handles:
            handle.remove()
    layout = LayerTensors(spec, dims)
    checkpoint = open_checkpoint(str(path))
    drops = 0
    assert sorted(cal.layers) == sorted(dims.moe_layers) == sorted(sums)
    for layer, layer_cal in cal.layers.items():
        experts = layout.read_experts(checkpoint, layer, 4, layout.width(layer))
        assert experts.gate is None and experts.up_bias is None
        sample = layer_cal.sample
        assert sample is not None and sample.size == layer_cal.tokens
        drops += int((sample.weights == 0).sum())
        got = routed_output(experts, sample.x, sample.indices, sample.weights, activation("relu"), scales_input=False)
        assert torch.allclose(got.sum(0), sums[layer], atol=1e-4, rtol=1e-4), layer
    assert drops > 0  # the capacity dropped some choices, and they were weighted 0


def test_merge_encoder_decoder_refusals(tiny, tmp_path):
    from moetool.errors import UnsupportedArchitectureError, UsageError
    from moetool.merge.api import MergeOptions, merge

    with pytest.raises(UnsupportedArchitectureError) as info:
        merge(str(tiny("switch_transformers")), tmp_path / "d", MergeOptions(to_dense=True), calibration=_data())
    assert info.value.code == "NO_DENSE_COUNTERPART" and "encoder-decoder" in info.value.message
    with pytest.raises(UsageError) as info:
        merge(str(tiny("nllb-moe")), tmp_path / "one", MergeOptions(num_experts=1), calibration=_data())
    assert info.value.code == "M_TOO_SMALL"
    assert not (tmp_path / "d").exists() and not (tmp_path / "one").exists()
