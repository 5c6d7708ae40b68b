"""Every command that runs a model gives the same results streamed (the default) and whole."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from moetool.data import Batch, Document
from moetool.io.checkpoint import Checkpoint
from moetool.runner import StreamedModel, StreamOptions
from moetool.runner.stream import WholeModel
from tests.tiny import build_tiny

ROUTING_FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "dbrx", "llama4_text", "gpt_oss"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runner-commands")
    out = {family: (build_tiny(family, root / family), root / family)[1] for family in ROUTING_FAMILIES}
    # Quantize calibrates on real text: a vocabulary as large as the example tokenizer's.
    for family in ("mixtral", "granitemoe"):
        build_tiny(family, root / f"{family}-4k", vocab_size=4096)
        out[f"{family}-4k"] = root / f"{family}-4k"
    return out


def _batches(count: int = 3, seed: int = 1) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, 128, (2, 16), generator=generator)
        mask = torch.ones_like(ids)
        mask[1, 11:] = 0
        out.append(Batch(ids, mask, ["a", "b"]))
    return out


def _whole(path: Path) -> WholeModel:
    from moetool.modeling import load_weights

    return WholeModel(load_weights(Checkpoint.open(path), device="cpu", dtype="float32"))


@pytest.mark.parametrize("family", ROUTING_FAMILIES)
def test_profile_counts_bit_exact(tiny: dict[str, Path], family: str) -> None:
    from moetool.routing.profile import profile_routing

    streamed = StreamedModel(Checkpoint.open(tiny[family]), StreamOptions(device="cpu"))
    a = profile_routing(streamed, _batches(), domains=["a", "b"])
    b = profile_routing(_whole(tiny[family]), _batches(), domains=["a", "b"])
    assert a.tokens == b.tokens > 0
    assert [layer.counts for layer in a.layers] == [layer.counts for layer in b.layers]
    assert [layer.domain_counts for layer in a.layers] == [layer.domain_counts for layer in b.layers]
    assert [layer.dropped for layer in a.layers] == [layer.dropped for layer in b.layers]
    for x, y in zip(a.layers, b.layers, strict=True):
        assert x.aux_loss == pytest.approx(y.aux_loss, rel=1e-9)


class _Tokenizer:
    """Whitespace-free stand-in: every character is its own token id (the tiny models have 128)."""

    pad_token_id = 0
    eos_token_id = None

    def __call__(self, text: str, **_kwargs: object) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) % 128 for c in text]}

    def __len__(self) -> int:
        return 128


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_perplexity_and_kl_match(tiny: dict[str, Path], family: str) -> None:
    from moetool.evaluate import evaluate

    documents = [Document("the quick brown fox jumps over the lazy dog " * 3, None) for _ in range(6)]
    streamed = StreamedModel(Checkpoint.open(tiny[family]), StreamOptions(device="cpu"))
    reference = StreamedModel(Checkpoint.open(tiny["mixtral"]), StreamOptions(device="cpu"))
    a = evaluate(streamed, _Tokenizer(), documents, seq_len=24, batch_size=2, reference_model=reference)
    b = evaluate(_whole(tiny[family]), _Tokenizer(), documents, seq_len=24, batch_size=2,
                 reference_model=_whole(tiny["mixtral"]))  # fmt: skip
    assert a.tokens == b.tokens > 0
    assert a.perplexity == pytest.approx(b.perplexity, rel=1e-6)
    assert a.kl == pytest.approx(b.kl, rel=1e-5, abs=1e-9)
    assert a.top1_agreement == b.top1_agreement
    assert a.reference_perplexity == pytest.approx(b.reference_perplexity, rel=1e-6)


@pytest.mark.parametrize("family", ["mixtral", "granitemoe"])
def test_quantized_codes_identical(tiny: dict[str, Path], tmp_path: Path, family: str) -> None:
    from safetensors.torch import load_file

    from moetool.quantize import CalibrationData, QuantizeOptions, quantize

    data = tmp_path / "calib.jsonl"
    data.write_text("\n".join('{"text": "%s"}' % ("lorem ipsum dolor sit amet " * (i + 3)) for i in range(12)))
    tokenizer_src = Path(__file__).resolve().parents[1] / "examples" / "tiny-moe"
    source = tiny[f"{family}-4k"]
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (source / name).write_bytes((tokenizer_src / name).read_bytes())
    calibration = CalibrationData(str(data), max_tokens=512, seq_len=32, batch_size=4)
    outputs = {}
    for whole in (False, True):
        out = tmp_path / f"q-{whole}"
        options = QuantizeOptions(bits=4, group_size=16, whole_model=whole)
        result = quantize(source, out, options, calibration=calibration, full_check=False)
        assert [(c.name, c.passed) for c in result.verification.checks][:3] == [
            ("coverage", True),
            ("exact", True),
            ("logits", True),
        ]
        outputs[whole] = load_file(out / "model.safetensors")
    assert set(outputs[False]) == set(outputs[True])
    assert all(torch.equal(outputs[False][k], outputs[True][k]) for k in outputs[False])
