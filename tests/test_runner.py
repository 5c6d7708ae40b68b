"""The layer-streamed runner: the same results as the whole model, one layer in memory at a time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from moetool.data import Batch
from moetool.errors import CheckpointError
from moetool.io.checkpoint import Checkpoint
from moetool.runner import StreamedModel, StreamOptions
from moetool.runner.memory import InsufficientMemoryError, check_fits, estimate
from tests.tiny import build_tiny

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-moe"

# Per-expert and fused experts, MLA, hybrid attention, shared experts, router-only-logits (DBRX),
# sigmoid routers with correction biases, tied and untied heads, and a dense family.
FAMILIES = [
    "mixtral",
    "qwen2_moe",
    "qwen3_next",
    "deepseek_v3",
    "gpt_oss",
    "dbrx",
    "llama4_text",
    "granitemoe",
    "llama",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runner-models")
    return {family: (build_tiny(family, root / family), root / family)[1] for family in FAMILIES}


def _batches(vocab: int, count: int = 3, rows: int = 2, length: int = 12, seed: int = 0) -> list[Batch]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        ids = torch.randint(0, vocab, (rows, length), generator=generator)
        mask = torch.ones_like(ids)
        mask[-1, length - 3 :] = 0  # padding in the last row
        out.append(Batch(ids, mask, [None] * rows))
    return out


def _reference_logits(path: Path, batches: list[Batch]) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.inference_mode():
        return [model(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False).logits for b in batches]


@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_logits_equal_from_pretrained(tiny: dict[str, Path], family: str) -> None:
    path = tiny[family]
    batches = _batches(128)
    want = _reference_logits(path, batches)
    runner = StreamedModel(Checkpoint.open(path), StreamOptions(device="cpu"))
    got = {index: logits for index, _, logits in runner.logits_batches(batches)}
    assert sorted(got) == list(range(len(batches)))
    for index, logits in got.items():
        assert torch.equal(logits, want[index]), family
    # Nothing stays loaded between passes.
    assert all(p.device.type == "meta" for p in runner.model.parameters())


def test_one_layer_in_memory_at_a_time(tiny: dict[str, Path]) -> None:
    runner = StreamedModel(Checkpoint.open(tiny["mixtral"]), StreamOptions(device="cpu"))
    batches = _batches(128)
    loaded_layers = []
    with runner.run(batches) as schedule:
        for _step in schedule.steps():
            live = [
                path
                for path in runner.layer_paths
                if any(p.device.type != "meta" for p in runner.model.get_submodule(path).parameters())
            ]
            loaded_layers.append(live)
            # The input embedding is freed once every batch is embedded.
            assert runner.model.get_input_embeddings().weight.device.type == "meta"
    assert loaded_layers == [[path] for path in runner.layer_paths]


def test_tied_head_and_example(tmp_path: Path) -> None:
    checkpoint = Checkpoint.open(EXAMPLE)
    runner = StreamedModel(checkpoint, StreamOptions(device="cpu"))
    assert runner.plan is not None and runner.plan.pieces["head"].aliases  # lm_head shares the embedding
    batches = _batches(4096, count=2, length=16)
    want = _reference_logits(EXAMPLE, batches)
    for index, _, logits in runner.logits_batches(batches):
        assert torch.equal(logits, want[index])


def test_segments_give_the_same_logits(tiny: dict[str, Path]) -> None:
    batches = _batches(128, count=5)
    checkpoint = Checkpoint.open(tiny["qwen2_moe"])
    one = {i: lg for i, _, lg in StreamedModel(checkpoint, StreamOptions(device="cpu")).logits_batches(batches)}
    # Two batches' positions per pass: three passes, each reading the weights again.
    small = StreamedModel(checkpoint, StreamOptions(device="cpu"), segment_tokens=2 * 2 * 12)
    several = {i: lg for i, _, lg in small.logits_batches(batches)}
    assert sorted(one) == sorted(several)
    assert all(torch.equal(one[i], several[i]) for i in one)


def test_whole_model_mode_runs_the_same_schedule(tiny: dict[str, Path]) -> None:
    batches = _batches(128)
    checkpoint = Checkpoint.open(tiny["deepseek_v3"])
    streamed = {i: lg for i, _, lg in StreamedModel(checkpoint, StreamOptions(device="cpu")).logits_batches(batches)}
    whole = StreamedModel(checkpoint, StreamOptions(device="cpu", whole_model=True))
    assert whole.plan is None
    for i, _, logits in whole.logits_batches(batches):
        assert torch.equal(logits, streamed[i])


def test_error_in_a_layer_unwinds_the_batch_threads(tiny: dict[str, Path]) -> None:
    import threading

    runner = StreamedModel(Checkpoint.open(tiny["mixtral"]), StreamOptions(device="cpu"))
    before = threading.active_count()
    with pytest.raises(RuntimeError, match="boom"), runner.run(_batches(128)) as schedule:
        for step in schedule.steps():
            if step.position == 1:
                raise RuntimeError("boom")
    assert threading.active_count() == before
    assert all(p.device.type == "meta" for p in runner.model.parameters())
    # The skeleton is usable again after the failed pass.
    assert len(list(runner.logits_batches(_batches(128, count=1)))) == 1


def test_missing_tensor_is_refused(tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    path = tmp_path / "m"
    build_tiny("mixtral", path)
    tensors = load_file(path / "model.safetensors")
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    runner = StreamedModel(Checkpoint.open(path), StreamOptions(device="cpu"))
    with pytest.raises(CheckpointError, match="missing") as info:
        list(runner.logits_batches(_batches(128, count=1)))
    assert info.value.code == "WEIGHTS_MISMATCH"


def test_memory_estimate_and_refusal(monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = Checkpoint.open(EXAMPLE)
    figures = estimate(checkpoint, "float32")
    assert figures.layers == 4 and figures.hidden_size == 160
    assert figures.weights_by_dtype["float32"] == checkpoint.total_bytes()  # stored in float32
    assert figures.weights_by_dtype["bfloat16"] == checkpoint.total_bytes() // 2
    assert figures.largest_layer_bytes < figures.weights_by_dtype["float32"] / 3
    assert figures.activation_bytes_per_token == 4 * 160 * 4
    assert figures.streamed_peak(1000) < figures.whole_peak(1000)
    monkeypatch.setattr("moetool.runner.memory.available_bytes", lambda device: 10**6)
    with pytest.raises(InsufficientMemoryError, match="need about") as info:
        check_fits(figures, tokens=1000, device="cpu")
    assert info.value.code == "OUT_OF_MEMORY"


def test_inspect_memory_json() -> None:
    from typer.testing import CliRunner

    from moetool.cli import app

    result = CliRunner().invoke(app, ["inspect", str(EXAMPLE), "--memory", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert set(doc["memory"]) == {"float32", "bfloat16"}
    assert doc["memory"]["bfloat16"]["largest_layer_bytes"] * 2 == doc["memory"]["float32"]["largest_layer_bytes"]
    assert doc["memory"]["float32"]["streamed_peak_bytes"] > 0


def test_config_only_memory_matches_headers() -> None:
    """Without headers, the figures come from the config-only count and agree with the headers' ones
    for a checkpoint stored in float32 (the example)."""
    from typer.testing import CliRunner

    from moetool.cli import app

    docs = {}
    for extra in ([], ["--config-only"]):
        result = CliRunner().invoke(app, ["inspect", str(EXAMPLE), "--memory", "--json", *extra])
        assert result.exit_code == 0, result.output
        docs[bool(extra)] = json.loads(result.stdout)["memory"]["float32"]
    headers, config_only = docs[False], docs[True]
    for key in ("largest_layer_bytes", "layers", "hidden_size", "activation_bytes_per_token", "params"):
        assert config_only[key] == headers[key], key
    assert config_only["weights_by_dtype"] == headers["weights_by_dtype"]
    assert config_only["streamed_peak_bytes"] == headers["streamed_peak_bytes"]


def test_config_only_memory_of_a_real_config() -> None:
    """Qwen3-30B-A3B from its config.json alone: one layer in bfloat16 is ~1.25 GB of the 61 GB."""
    from moetool.count.params import count_from_config
    from moetool.runner.memory import estimate_from_counts

    path = Path(__file__).parent / "data" / "moe-configs" / "Qwen__Qwen3-30B-A3B" / "config.json"
    config = json.loads(path.read_text())
    figures = estimate_from_counts(count_from_config(config), config, "bfloat16")
    assert figures.layers == 48
    assert 1.2e9 < figures.largest_layer_bytes < 1.3e9
    assert 60e9 < figures.weights_by_dtype["bfloat16"] < 62e9
    assert figures.streamed_peak(65536) < 4e9
