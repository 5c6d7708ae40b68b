"""``moetool distill``: loss math, schedule, data order, the teacher cache, and whole runs on a tiny MoE.

The runs use a tiny random Mixtral (tests/tiny.py) with a word-level tokenizer and a few steps of
16-token windows; every run sets one CPU thread so that the float results do not depend on the load of
the machine (the resume test compares weights bit for bit).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from moetool.data import DatasetSpec
from moetool.distill.options import DistillOptions
from moetool.errors import MoetoolError, UsageError
from tests.helpers import corpus, make_tokenizer
from tests.tiny import build_tiny

SEQ = 16


# ----------------------------------------------------------------------------- loss


def _logits(*shape: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=generator) * 3


def test_kl_matches_the_definition():
    from moetool.distill.loss import kl_per_position

    student, teacher = _logits(2, 5, 11, seed=1), _logits(2, 5, 11, seed=2)
    for temperature in (1.0, 2.0):
        p = torch.softmax(teacher / temperature, -1)
        q = torch.softmax(student / temperature, -1)
        expected = (p * (p.log() - q.log())).sum(-1)
        assert torch.allclose(kl_per_position(student, teacher, temperature), expected, atol=1e-6)
    assert torch.allclose(kl_per_position(teacher, teacher, 1.0), torch.zeros(2, 5), atol=1e-6)


def test_kd_loss_scales_by_t_squared_and_mixes_by_alpha():
    from moetool.distill.loss import cross_entropy, kd_loss, kl_per_position

    student, teacher = _logits(2, 6, 13, seed=3), _logits(2, 6, 13, seed=4)
    labels = torch.randint(0, 13, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones(2, 6)
    mask[1, 4:] = 0  # masked positions take no part
    kl2 = (kl_per_position(student, teacher, 2.0) * mask).sum() / mask.sum()
    ce = cross_entropy(student, labels, mask)
    parts = kd_loss(student, labels, mask, alpha=1.0, temperature=2.0, teacher_logits=teacher)
    assert parts.kd == pytest.approx(4 * float(kl2), rel=1e-6)
    assert float(parts.loss) == pytest.approx(parts.kd, rel=1e-6)
    assert parts.tokens == 10
    mixed = kd_loss(student, labels, mask, alpha=0.25, temperature=2.0, teacher_logits=teacher)
    assert float(mixed.loss) == pytest.approx(0.25 * 4 * float(kl2) + 0.75 * float(ce), rel=1e-6)
    # alpha 0 is plain cross-entropy and needs no teacher at all.
    plain = kd_loss(student, labels, mask, alpha=0.0, temperature=2.0)
    assert float(plain.loss) == pytest.approx(float(ce), rel=1e-6) and plain.kd == 0.0
    with pytest.raises(ValueError):
        kd_loss(student, labels, mask, alpha=0.5, temperature=1.0)


def _topk(teacher: torch.Tensor, k: int, temperature: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    log_p = torch.log_softmax(teacher / temperature, -1)
    values, indices = log_p.topk(k, dim=-1)
    rest = torch.logsumexp(log_p.scatter(-1, indices, float("-inf")), dim=-1)
    return values, indices, rest


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_topk_kl_equals_full_kl_when_k_is_the_vocabulary(temperature):
    from moetool.distill.loss import kl_per_position, kl_topk_per_position

    student, teacher = _logits(3, 4, 17, seed=6), _logits(3, 4, 17, seed=7)
    full = kl_per_position(student, teacher, temperature)
    exact = kl_topk_per_position(student, *_topk(teacher, 17, temperature), temperature)
    assert torch.allclose(exact, full, atol=1e-5)
    # Fewer tokens: the rest is one outcome, so the KL can only go down (and stays close).
    for k in (1, 4, 8):
        approx = kl_topk_per_position(student, *_topk(teacher, k, temperature), temperature)
        assert torch.all(approx <= full + 1e-5)
        assert torch.all(approx >= 0)


def test_gradients_flow_only_to_the_student():
    from moetool.distill.loss import kd_loss

    student = _logits(1, 3, 7, seed=8).requires_grad_(True)
    teacher = _logits(1, 3, 7, seed=9)
    parts = kd_loss(student, torch.zeros(1, 3, dtype=torch.long), torch.ones(1, 3), alpha=0.5, temperature=2.0,
                    teacher_logits=teacher)  # fmt: skip
    parts.loss.backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


# ----------------------------------------------------------------------------- schedule, data, cache


def test_schedule_warms_up_then_decays_to_the_floor():
    from moetool.distill.schedule import lr_factor

    kw = {"total": 100, "warmup": 10, "min_ratio": 0.1}
    assert lr_factor(0, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(9, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(10, schedule="cosine", **kw) == pytest.approx(1.0)
    assert lr_factor(99, schedule="cosine", **kw) == pytest.approx(0.1)
    assert lr_factor(99, schedule="linear", **kw) == pytest.approx(0.1)
    assert lr_factor(50, schedule="constant", **kw) == 1.0
    values = [lr_factor(s, schedule="cosine", **kw) for s in range(10, 100)]
    assert values == sorted(values, reverse=True)


def test_window_order_is_a_function_of_seed_and_position(tokenizer_words):
    from moetool.distill.data import build_train_data, split_heldout

    train, heldout = split_heldout(corpus(60))
    assert len(heldout) == 3 and len(train) == 57
    data = build_train_data(tokenizer_words, train, seq_len=8, max_tokens=None, name="corpus")
    n = data.num_windows
    epoch = data.window_ids(0, n, seed=0)
    assert sorted(epoch) == list(range(n))  # an epoch reads every window once
    assert data.window_ids(3, 5, seed=0) == epoch[3:8]
    assert data.window_ids(n, n, seed=0) != epoch  # the next epoch is shuffled anew
    assert data.window_ids(0, n, seed=1) != epoch
    again = build_train_data(tokenizer_words, train, seq_len=8, max_tokens=None, name="corpus")
    assert again.fingerprint == data.fingerprint and again.window_ids(0, 2 * n, seed=0) == data.window_ids(0, 2 * n, 0)


def test_teacher_cache_round_trip(tmp_path):
    from moetool.distill import teacher_cache as tc
    from moetool.distill.loss import kl_per_position, kl_topk_per_position

    vocab, seq, k = 12, 6, 12
    meta = tc.expected_meta(k=k, temperature=2.0, fingerprint="x", teacher="t", windows=4, seq_len=seq, vocab=vocab)
    assert tc.open_cache(tmp_path, meta) is None
    cache = tc.create_cache(tmp_path, meta, create=True)
    teacher = _logits(2, seq, vocab, seed=10)
    cache.write([3, 1], teacher, 2.0)
    cache.mark_complete()
    reopened = tc.open_cache(tmp_path, meta)
    assert reopened is not None
    assert tc.open_cache(tmp_path, {**meta, "temperature": 1.0}) is None  # another run's cache is not reused
    logprobs, indices, rest = reopened.read([3, 1], "cpu")
    assert logprobs.shape == (2, seq - 1, k) and torch.isinf(rest).all()
    student = _logits(2, seq - 1, vocab, seed=11)
    # float16 storage of the log-probabilities: equal to the exact KL to about 1e-3.
    cached = kl_topk_per_position(student, logprobs, indices, rest, 2.0)
    assert torch.allclose(cached, kl_per_position(student, teacher[:, :-1], 2.0), atol=5e-3)


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"alpha": 1.5}, "--alpha"),
        ({"alpha": -0.1}, "--alpha"),
        ({"temperature": 0.0}, "--temperature"),
        ({"temperature": float("nan")}, "--temperature"),
        ({"lr": -1.0}, "--lr"),
        ({"steps": 0}, "--steps"),
        ({"warmup_steps": 5, "steps": 5}, "--warmup-steps"),
        ({"schedule": "wobble"}, "--schedule"),
        ({"init": "top1", "intermediate_size": 64}, "--intermediate-size"),
        ({"cache_topk": 8, "alpha": 0.0}, "--cache-topk"),
        ({"dtype": "int3"}, "--dtype"),
    ],
)
def test_bad_options_are_refused(changes, fragment):
    with pytest.raises(UsageError) as info:
        DistillOptions(**changes).check()
    assert fragment in info.value.message and info.value.exit_code == 2


def test_fingerprint_leaves_out_what_does_not_change_training():
    base = DistillOptions(steps=50)
    assert base.fingerprint() == DistillOptions(steps=50, save_every=7, log_every=3, threads=1).fingerprint()
    assert base.fingerprint() != DistillOptions(steps=50, lr=5e-4).fingerprint()
    assert base.fingerprint()["warmup_steps"] == base.warmup == 2


# ----------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def tokenizer_words():
    return make_tokenizer()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    teacher = root / "moe"
    # Tied embeddings, like the example MoE: checkpoints and the written student must handle the shared tensor.
    build_tiny("mixtral", teacher, tie_word_embeddings=True)
    make_tokenizer(path=teacher)
    dense = root / "llama"
    build_tiny("llama", dense)
    make_tokenizer(path=dense)
    return {"root": root, "teacher": teacher, "dense": dense, "train": corpus(200), "heldout": corpus(30)[::3]}


def _options(**changes) -> DistillOptions:
    base = {
        "steps": 6,
        "lr": 1e-2,
        "batch_size": 4,
        "seq_len": SEQ,
        "calibration_tokens": 400,
        "eval_max_tokens": 400,
        "log_every": 1,
        "save_every": 2,
        "threads": 1,
    }
    base.update(changes)
    return DistillOptions(**base)


def _run(setup, name: str, *, options: DistillOptions | None = None, **kwargs):
    from moetool.distill import distill

    kwargs.setdefault("eval_data", DatasetSpec.of_documents(setup["heldout"], "heldout"))
    return distill(
        str(setup["teacher"]),
        setup["root"] / name,
        data=DatasetSpec.of_documents(setup["train"], "corpus"),
        options=options or _options(),
        device="cpu",
        **kwargs,
    )


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_student_loads_in_stock_transformers_as_the_dense_architecture(setup):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result = _run(setup, "student")
    out = setup["root"] / "student"
    assert not (setup["root"] / "student.partial").exists()  # the checkpoint folder goes once published
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert type(model).__name__ == "MistralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mistral" and config["architectures"] == ["MistralForCausalLM"]
    assert "num_local_experts" not in config and config["intermediate_size"] == 2 * 48  # top-2 x expert width
    AutoTokenizer.from_pretrained(out)
    card = (out / "README.md").read_text()
    assert "teacher perplexity" in card and "student perplexity at initialisation" in card
    assert "student perplexity (trained)" in card and "distillation" in card
    doc = result.to_json()
    assert doc["schema_version"] == 1 and doc["student"]["init"] == "concat"
    figures = doc["eval"]
    for key in ("teacher_perplexity", "student_init_perplexity", "student_perplexity"):
        assert math.isfinite(figures[key]) and figures[key] > 1
    assert doc["training"]["tokens"] == 6 * 4 * SEQ and len(doc["training"]["loss_curve"]) == 6
    json.dumps(doc, allow_nan=False)


def test_a_tiny_run_lowers_the_kd_loss(setup):
    result = _run(setup, "lowers", options=_options(steps=12, lr=2e-2, alpha=1.0, init="random", save_every=100))
    kd = [entry["kd"] for entry in result.state.loss_curve]
    assert len(kd) == 12
    assert sum(kd[-3:]) / 3 < 0.8 * sum(kd[:3]) / 3
    figures = result.evaluation
    assert figures is not None and figures.kl is not None and figures.init_kl is not None
    assert figures.kl < figures.init_kl  # closer to the teacher on held-out text too


def test_resume_continues_from_the_same_step_with_identical_weights(setup):
    from moetool.distill.checkpoint import latest_checkpoint, read_state
    from moetool.distill.train import DistillInterrupted

    _run(setup, "straight", options=_options(save_every=100))
    stops, steps = [], []

    def stop_at_3(stage, advance=0, total=None, **_):
        steps.extend([stage] * (stage == "training"))
        if len(steps) == 3:
            stops.append(3)
            raise KeyboardInterrupt  # what Ctrl-C does, at a step boundary

    with pytest.raises(DistillInterrupted) as info:
        _run(setup, "resumed", progress=stop_at_3)
    assert info.value.exit_code == 130 and stops == [3]
    assert "--resume" in (info.value.hint or "")
    assert not (setup["root"] / "resumed").exists()  # never a half output
    checkpoint = latest_checkpoint(setup["root"] / "resumed.partial")
    assert checkpoint is not None and read_state(checkpoint)[0].step == 3

    result = _run(setup, "resumed", resume=True)
    assert result.session_start_step == 3 and result.state.step == 6 and result.state.sessions == [0, 3]
    straight, resumed = _weights(setup["root"] / "straight"), _weights(setup["root"] / "resumed")
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_cached_topk_teacher_trains_and_resumes(setup):
    from moetool.distill.train import DistillInterrupted

    options = _options(cache_topk=8, alpha=1.0, temperature=2.0)

    steps = []

    def stop_at_2(stage, advance=0, total=None, **_):
        steps.extend([stage] * (stage == "training"))
        if len(steps) == 2:
            raise KeyboardInterrupt

    with pytest.raises(DistillInterrupted):
        _run(setup, "cached", options=options, progress=stop_at_2)
    cache_meta = setup["root"] / "cached.partial" / "teacher-cache" / "teacher-topk.json"
    assert json.loads(cache_meta.read_text())["complete"] is True
    result = _run(setup, "cached", options=options, resume=True)
    assert result.state.step == 6 and result.evaluation is not None
    assert result.evaluation.kl is None  # the teacher was freed: no KL against it at the end
    assert math.isfinite(result.evaluation.student)


def test_init_from_a_dense_checkpoint_and_refusals(setup):
    result = _run(setup, "from-path", options=_options(init=str(setup["dense"]), steps=2))
    assert result.student["architecture"] == "LlamaForCausalLM"
    with pytest.raises(MoetoolError) as info:
        _run(setup, "from-moe", options=_options(init=str(setup["teacher"]), steps=2))
    assert info.value.code == "NOT_DENSE"


def test_refusals_before_any_work(setup):
    from moetool.distill import distill

    root = setup["root"]
    with pytest.raises(MoetoolError) as info:
        distill(str(setup["dense"]), root / "x", data=DatasetSpec.of_documents(setup["train"], "c"), options=_options())
    assert info.value.code == "NOT_MOE"
    (root / "taken").mkdir()
    (root / "taken" / "file").write_text("x")
    with pytest.raises(MoetoolError) as info:
        _run(setup, "taken")
    assert info.value.code == "OUTPUT_EXISTS" and info.value.exit_code == 2
    with pytest.raises(MoetoolError) as info:
        _run(setup, "nothing", resume=True)
    assert info.value.code == "NOTHING_TO_RESUME"
    with pytest.raises(MoetoolError) as info:
        _run(setup, "bad-init", options=_options(init="concatt"))
    assert info.value.code == "OPTION_INVALID"
    assert not (root / "x").exists() and not (root / "nothing").exists()


def test_checkpoint_of_an_earlier_run_needs_resume_and_the_same_settings(setup):
    from moetool.distill.train import DistillInterrupted

    def stop_at_1(stage, advance=0, total=None, **_):
        if stage == "training":
            raise KeyboardInterrupt

    with pytest.raises(DistillInterrupted):
        _run(setup, "twice", progress=stop_at_1)
    with pytest.raises(MoetoolError) as info:
        _run(setup, "twice")
    assert info.value.code == "CHECKPOINT_EXISTS"
    with pytest.raises(MoetoolError) as info:
        _run(setup, "twice", options=_options(lr=5e-3), resume=True)
    assert info.value.code == "RESUME_MISMATCH" and "lr" in info.value.message
