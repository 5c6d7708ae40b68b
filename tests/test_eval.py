"""Tests for moetool.modeling, moetool.evaluate and ``moetool eval``.

Tiny random checkpoints (tests/tiny.py) with a word-level tokenizer saved beside them; the figures are
checked against transformers' own loss and a direct KL computation.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moetool.cli import app
from moetool.data import DatasetSpec, Document, iter_windows
from moetool.errors import CheckpointError, DatasetError, ModelLoadError, UnsupportedArchitectureError, UsageError
from moetool.evaluate import EvalResult, evaluate
from moetool.modeling import (
    LOADERS,
    check_same_tokenizer,
    load_model_and_tokenizer,
    open_checkpoint,
    resolve_device,
    resolve_dtype,
)
from tests.helpers import WORDS, corpus, make_tokenizer
from tests.tiny import build_tiny

ROOT = Path(__file__).resolve().parents[1]
MODEL_TYPE = "qwen2_moe"  # routed + gated shared experts, and a dense layer in between
SEQ_LEN = 24


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Three tiny checkpoints: a, b (another seed, same tokenizer), and c (a's weights, another tokenizer)."""
    root = tmp_path_factory.mktemp("eval-models")
    paths = {name: root / name for name in ("a", "b", "c")}
    build_tiny(MODEL_TYPE, paths["a"], seed=0)
    build_tiny(MODEL_TYPE, paths["b"], seed=1)
    make_tokenizer(path=paths["a"])
    make_tokenizer(path=paths["b"])
    shutil.copytree(paths["a"], paths["c"])
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (paths["c"] / name).unlink()
    make_tokenizer(list(reversed(WORDS)), path=paths["c"])
    return paths


@pytest.fixture(scope="module")
def model_a(models):
    return load_model_and_tokenizer(str(models["a"]), device="cpu")


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("eval-data") / "held-out.jsonl"
    path.write_text("".join(json.dumps({"text": d.text, "src": d.domain}) + "\n" for d in corpus()), encoding="utf-8")
    return path


def direct_losses(model, windows) -> list[tuple[float, int]]:
    """transformers' own mean loss of each window (labels = input_ids), with its number of predictions."""
    out = []
    with torch.no_grad():
        for window in windows:
            ids = torch.tensor([window.input_ids])
            out.append((float(model(input_ids=ids, labels=ids).loss), len(window.input_ids) - 1))
    return out


# ----------------------------------------------------------------------------- loading


def test_load_model(model_a, models):
    model, tokenizer, checkpoint = model_a
    assert not model.training
    assert next(model.parameters()).dtype == torch.float32  # auto on CPU
    assert model.config.model_type == MODEL_TYPE
    assert tokenizer.eos_token_id == 2
    assert checkpoint.root == models["a"]


def test_devices_and_dtypes():
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("CPU") == torch.device("cpu")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    assert resolve_dtype("half", "cpu") == torch.float16
    for bad in (lambda: resolve_device("tpu"), lambda: resolve_dtype("float8"), lambda: resolve_dtype("int4", "cpu")):
        with pytest.raises(UsageError):
            bad()
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA"):
            resolve_device("cuda")
    with pytest.raises(UsageError):
        load_model_and_tokenizer("unused", device_map="everywhere")


def test_missing_tokenizer(models, tmp_path):
    folder = tmp_path / "no-tokenizer"
    shutil.copytree(models["a"], folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ModelLoadError) as excinfo:
        load_model_and_tokenizer(str(folder), device="cpu")
    assert excinfo.value.code == "TOKENIZER_MISSING"
    assert "tokenizer files" in excinfo.value.hint


def test_no_weights(models, tmp_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(models["a"] / name, folder / name)
    with pytest.raises(CheckpointError) as excinfo:
        load_model_and_tokenizer(str(folder), device="cpu")
    assert excinfo.value.code == "WEIGHTS_MISSING"


def test_weights_not_matching_config(models, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "broken"
    shutil.copytree(models["a"], folder)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.0.self_attn.q_proj.weight"]
    tensors["model.extra.weight"] = torch.zeros(2)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as excinfo:
        load_model_and_tokenizer(str(folder), device="cpu")
    assert excinfo.value.code == "WEIGHTS_MISMATCH"
    assert "missing model.layers.0.self_attn.q_proj.weight" in excinfo.value.message
    assert "unexpected model.extra.weight" in excinfo.value.message


@pytest.mark.parametrize(
    ("edit", "error", "code"),
    [
        ({"model_type": "no_such_moe"}, UnsupportedArchitectureError, "UNSUPPORTED_ARCH"),
        (
            {"model_type": "no_such_moe", "auto_map": {"AutoModelForCausalLM": "m.M"}},
            ModelLoadError,
            "REMOTE_CODE_REFUSED",
        ),
    ],
)
def test_families_transformers_cannot_run(models, tmp_path, edit, error, code):
    folder = tmp_path / "odd"
    shutil.copytree(models["a"], folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(edit)
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(error) as excinfo:
        load_model_and_tokenizer(str(folder), device="cpu")
    assert excinfo.value.code == code


def test_quantized_loader_hook(models, tmp_path, monkeypatch):
    folder = tmp_path / "quantized"
    shutil.copytree(models["a"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "moetool-test"}
    (folder / "config.json").write_text(json.dumps(config))
    calls = []

    def loader(checkpoint, *, dtype, device, device_map):
        calls.append((checkpoint.root, dtype, device, device_map))
        return "the model"

    monkeypatch.setitem(LOADERS, "moetool-test", loader)
    model, _, _ = load_model_and_tokenizer(str(folder), device="cpu")
    assert model == "the model"
    assert calls == [(folder, torch.float32, torch.device("cpu"), None)]


def test_tokenizer_comparison(model_a, models):
    from moetool.modeling import load_tokenizer

    tokenizer = model_a[1]
    check_same_tokenizer(tokenizer, load_tokenizer(open_checkpoint(str(models["b"]))))
    with pytest.raises(ModelLoadError) as excinfo:
        check_same_tokenizer(tokenizer, load_tokenizer(open_checkpoint(str(models["c"]))))
    assert excinfo.value.code == "TOKENIZER_MISMATCH"
    with pytest.raises(ModelLoadError, match="tokens"):
        check_same_tokenizer(tokenizer, make_tokenizer([*WORDS, "extra"]))
    with pytest.raises(ModelLoadError, match="end-of-sequence"):
        check_same_tokenizer(tokenizer, make_tokenizer(eos=False))


# ----------------------------------------------------------------------------- perplexity


def _data(documents, **sizes) -> DatasetSpec:
    return DatasetSpec.of_documents(documents, **sizes)


def test_single_window_matches_transformers_loss(model_a):
    model, tokenizer, _ = model_a
    documents = corpus()
    result = evaluate(model, tokenizer, _data(documents, seq_len=SEQ_LEN, max_tokens=SEQ_LEN))
    [window] = list(iter_windows(tokenizer, documents, seq_len=SEQ_LEN, max_tokens=SEQ_LEN))
    [(loss, n)] = direct_losses(model, [window])
    assert (result.windows, result.tokens, result.input_tokens) == (1, SEQ_LEN - 1, SEQ_LEN) and n == SEQ_LEN - 1
    assert result.nll == pytest.approx(loss, abs=1e-5)
    assert result.perplexity == pytest.approx(math.exp(loss), rel=1e-5)


@pytest.mark.parametrize("batch_size", [1, 3])
def test_token_weighted_mean_over_windows(model_a, batch_size):
    model, tokenizer, _ = model_a
    documents = corpus(20)
    windows = list(iter_windows(tokenizer, documents, seq_len=SEQ_LEN))
    lengths = {len(w.input_ids) for w in windows}
    assert len(windows) > 6 and len(lengths) > 1  # full windows and shorter per-domain remainders (padding)
    direct = direct_losses(model, windows)
    expected = sum(loss * n for loss, n in direct) / sum(n for _, n in direct)
    result = evaluate(model, tokenizer, _data(documents, seq_len=SEQ_LEN, batch_size=batch_size))
    assert result.tokens == sum(n for _, n in direct)
    assert result.windows == len(windows)
    assert result.nll == pytest.approx(expected, abs=1e-5)
    # Per domain: token counts add up, and the token-weighted mean of the domains is the total.
    assert set(result.per_domain) == {"code", "math", "web"}
    assert sum(d["tokens"] for d in result.per_domain.values()) == result.tokens
    weighted = sum(d["nll"] * d["tokens"] for d in result.per_domain.values()) / result.tokens
    assert weighted == pytest.approx(result.nll, abs=1e-9)
    assert "kl" not in result.per_domain["code"]


def test_reference_itself_and_another(model_a, models):
    model, tokenizer, _ = model_a
    documents = corpus(30)
    same, _, _ = load_model_and_tokenizer(str(models["a"]), device="cpu")
    result = evaluate(model, tokenizer, _data(documents, seq_len=SEQ_LEN, batch_size=4), reference_model=same)
    assert abs(result.kl) < 1e-7
    assert result.top1_agreement == 1.0
    assert all(d["top1_agreement"] == 1.0 for d in result.per_domain.values())

    other, other_tokenizer, _ = load_model_and_tokenizer(str(models["b"]), device="cpu")
    result = evaluate(
        model, tokenizer, _data(documents, seq_len=SEQ_LEN, max_tokens=SEQ_LEN), reference_model=other,
        reference_tokenizer=other_tokenizer,
    )  # fmt: skip
    assert result.kl > 1e-4 and 0.0 <= result.top1_agreement < 1.0
    # The same KL computed directly from the two models' logits on the single window.
    [window] = list(iter_windows(tokenizer, documents, seq_len=SEQ_LEN, max_tokens=SEQ_LEN))
    ids = torch.tensor([window.input_ids])
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        log_q = torch.log_softmax(other(input_ids=ids).logits[0, :-1].double(), -1)
    kl = torch.nn.functional.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1).mean()
    assert result.kl == pytest.approx(float(kl), rel=1e-4, abs=1e-8)
    agree = (log_p.argmax(-1) == log_q.argmax(-1)).double().mean()
    assert result.top1_agreement == pytest.approx(float(agree))

    with pytest.raises(ModelLoadError, match="end-of-sequence"):
        no_eos = make_tokenizer(eos=False)
        evaluate(model, tokenizer, _data(documents, seq_len=SEQ_LEN), reference_model=same, reference_tokenizer=no_eos)


def test_evaluate_refusals(model_a):
    model, tokenizer, _ = model_a
    limit = model.config.max_position_embeddings
    with pytest.raises(UsageError, match="max_position_embeddings"):
        evaluate(model, tokenizer, _data(corpus(), seq_len=limit + 1))
    with pytest.raises(DatasetError) as excinfo:
        evaluate(model, tokenizer, _data([Document("the")], seq_len=SEQ_LEN, max_tokens=1))
    assert excinfo.value.code == "DATASET_EMPTY"
    big = make_tokenizer([f"w{i}" for i in range(200)])
    with pytest.raises(ModelLoadError, match="embeddings"):
        evaluate(model, big, _data([Document("w150 w199 w3")], seq_len=SEQ_LEN))


def test_result_json_is_finite():
    result = EvalResult(model="m", tokens=1, windows=1, nll=800.0, perplexity=math.inf)
    document = result.to_json()
    assert document["schema_version"] == 1 and document["perplexity"] is None
    json.dumps(document, allow_nan=False)


# ----------------------------------------------------------------------------- CLI


def invoke(*args: str):
    result = CliRunner().invoke(app, list(args), env={"NO_COLOR": "1", "COLUMNS": "120", "HF_HUB_OFFLINE": "1"})
    return result


def test_cli_json(models, dataset):
    result = invoke("eval", str(models["a"]), "--dataset", str(dataset), "--seq-len", str(SEQ_LEN), "--json")
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["schema_version"] == 1
    assert document["model"] == str(models["a"])
    assert document["tokens"] > 0 and document["perplexity"] == pytest.approx(math.exp(document["nll"]))
    assert document["kl"] is None and document["top1_agreement"] is None
    assert result.stderr == ""


def test_cli_json_with_reference_and_domains(models, dataset):
    result = invoke(
        "eval",
        str(models["a"]),
        "-d",
        str(dataset),
        "--reference",
        str(models["b"]),
        "--domain-field",
        "src",
        "--seq-len",
        str(SEQ_LEN),
        "--max-tokens",
        "200",
        "--batch-size",
        "3",
        "--json",
    )
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert document["input_tokens"] == 200
    assert document["reference"] == str(models["b"])
    assert document["kl"] > 0 and 0 <= document["top1_agreement"] <= 1
    assert set(document["per_domain"]) <= {"code", "math", "web"}
    assert all({"tokens", "perplexity", "kl", "top1_agreement"} <= set(d) for d in document["per_domain"].values())


def test_cli_human_output(models, dataset):
    result = invoke(
        "eval", str(models["a"]), "-d", str(dataset), "--reference", str(models["a"]), "--domain-field", "src",
        "--seq-len", str(SEQ_LEN), "--max-tokens", "100",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    for needle in ("perplexity", "tokens scored", "KL(ref", "top-1 agreement", "100.00%", "Per domain", "code"):
        assert needle in result.stdout
    assert result.stderr == ""  # progress only on a terminal


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("error:")
    return lines[0]


def test_cli_tokenizer_mismatch(models, dataset):
    result = invoke("eval", str(models["a"]), "-d", str(dataset), "--reference", str(models["c"]), "--seq-len", "8")
    assert result.exit_code == 1
    assert "different tokenizers" in one_error_line(result.stderr)


def test_cli_usage_errors(models, dataset):
    result = invoke("eval", str(models["a"]), "-d", str(dataset), "--device", "tpu")
    assert result.exit_code == 2 and "--device" in one_error_line(result.stderr)
    result = invoke("eval", str(models["a"]), "-d", str(dataset), "--seq-len", "200")
    assert result.exit_code == 2 and "max_position_embeddings" in one_error_line(result.stderr)


PROBE = """
import sys
sys.argv = ["moetool", *{args!r}]
from moetool.cli import main
try:
    main()
except SystemExit as exc:
    print("EXIT=" + str(exc.code), file=sys.stderr)
print("TORCH=" + str("torch" in sys.modules), file=sys.stderr)
"""


def test_cli_bad_dataset_fails_before_any_model_loads(models, tmp_path):
    """B29: a missing column is one line and exit 1, before torch is even imported."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"content": "the cat", "id": 1}\n', encoding="utf-8")
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
    env.pop("MOETOOL_DEBUG", None)
    args = ["eval", str(models["a"]), "--dataset", str(data)]
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(args=args)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60
    )
    lines = result.stderr.splitlines()
    assert lines[-2:] == ["EXIT=1", "TORCH=False"], result.stderr
    line = one_error_line("\n".join(lines[:-2]))
    assert "no text field 'text'" in line and "'content'" in line
    assert result.stdout == ""
