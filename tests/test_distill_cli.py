"""``moetool distill`` through the CLI: --json document, human report, exit codes, Ctrl-C, ``python -m``."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import pytest

from tests import helpers
from tests.helpers import corpus, make_tokenizer
from tests.tiny import build_tiny

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--seq-len", "16", "--batch-size", "4", "--calibration-tokens", "300", "--eval-max-tokens", "300",
        "--threads", "1"]  # fmt: skip


# The one CLI runner (tests/helpers.py), with this file's settings.
run_cli = partial(helpers.run_cli, columns=160)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill-cli")
    teacher = root / "moe"
    build_tiny("mixtral", teacher)
    make_tokenizer(path=teacher)
    dense = root / "dense"
    build_tiny("mistral", dense)
    make_tokenizer(path=dense)
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in corpus(200)), encoding="utf-8")
    heldout = root / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in corpus(30)[::3]), encoding="utf-8")
    return {"root": root, "teacher": teacher, "dense": dense, "data": data, "heldout": heldout}


def test_json_document(setup):
    out = setup["root"] / "student"
    result = run_cli("distill", str(setup["teacher"]), "-o", str(out), "-d", str(setup["data"]), "--eval-dataset",
                     str(setup["heldout"]), "--steps", "4", "--json", *FAST)  # fmt: skip
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    assert doc["student"]["architecture"] == "MistralForCausalLM" and doc["student"]["init"] == "concat"
    training = doc["training"]
    assert training["steps"] == 4 and training["tokens"] == 4 * 4 * 16 and training["processes"] == 1
    assert training["alpha"] == 0.9 and training["temperature"] == 1.0 and training["threads"] == 1
    assert len(training["loss_curve"]) == 1  # --log-every 10: the last step only
    figures = doc["eval"]
    assert figures["dataset"] == str(setup["heldout"])
    for key in ("teacher_perplexity", "student_init_perplexity", "student_perplexity", "student_kl"):
        assert figures[key] > 0
    assert "model.safetensors" in doc["files"] and "README.md" in doc["files"]
    assert not Path(doc["checkpoint_dir"]).exists()
    card = (out / "README.md").read_text()
    # Counts are not secrets: the card's command keeps them.
    assert "--calibration-tokens 300" in card and "--eval-max-tokens 300" in card


def test_human_report_with_a_held_out_split(setup):
    out = setup["root"] / "human"
    result = run_cli("distill", str(setup["teacher"]), "-o", str(out), "-d", str(setup["data"]), "--steps", "2",
                     "--init", "random", *FAST)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "student at init" in result.stdout and "student trained" in result.stdout
    assert "1 document in 20" in result.stdout
    assert "step 2/2" in result.stderr  # without a terminal: log lines instead of a bar
    assert json.loads((out / "config.json").read_text())["model_type"] == "mistral"


@pytest.mark.parametrize(
    ("args", "code", "exit_code"),
    [
        (["--alpha", "1.5"], "OPTION_INVALID", 2),
        (["--temperature", "0"], "OPTION_INVALID", 2),
        (["--init", "top1", "--intermediate-size", "8"], "OPTION_INVALID", 2),
        (["--dtype", "int3"], "DTYPE_INVALID", 2),
        (["--max-shard-size", "lots"], "USAGE", 2),
    ],
)
def test_bad_options(setup, args, code, exit_code):
    out = setup["root"] / "never"
    result = run_cli("distill", str(setup["teacher"]), "-o", str(out), "-d", str(setup["data"]), *args, "--json")
    assert result.returncode == exit_code, result.stderr
    assert json.loads(result.stdout)["error"]["code"] == code
    assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert not out.exists()


def test_bad_inputs(setup):
    root = setup["root"]
    dense = run_cli("distill", str(setup["dense"]), "-o", str(root / "x"), "-d", str(setup["data"]), "--json", *FAST)
    assert dense.returncode == 1 and json.loads(dense.stdout)["error"]["code"] == "NOT_MOE"
    missing = run_cli("distill", str(setup["teacher"]), "-o", str(root / "x"), "-d", str(root / "nope.jsonl"), *FAST)
    assert missing.returncode == 1 and "nope.jsonl" in missing.stderr
    (root / "exists").mkdir()
    (root / "exists" / "a").write_text("x")
    taken = run_cli("distill", str(setup["teacher"]), "-o", str(root / "exists"), "-d", str(setup["data"]), *FAST)
    assert taken.returncode == 2 and "--overwrite" in taken.stderr
    resume = run_cli("distill", str(setup["teacher"]), "-o", str(root / "y"), "-d", str(setup["data"]), "--resume",
                     *FAST)  # fmt: skip
    assert resume.returncode == 2 and "no checkpoint" in resume.stderr
    usage = run_cli("distill", str(setup["teacher"]), "-d", str(setup["data"]))
    assert usage.returncode == 2
    for result in (dense, missing, taken, resume):
        assert "Traceback" not in result.stderr
    assert not (root / "x").exists() and not (root / "y").exists()


def test_ctrl_c_leaves_a_resumable_checkpoint_and_no_output(setup):
    out = setup["root"] / "interrupted"
    partial = setup["root"] / "interrupted.partial"
    # Many steps, so the run is still training when the signal comes; the step-0 checkpoint is written
    # before training starts, so from then on an interruption always has something to resume.
    process = subprocess.Popen(
        [sys.executable, "-m", "moetool", "distill", str(setup["teacher"]), "-o", str(out), "-d",
         str(setup["data"]), "--steps", "100000", "--save-every", "100000", *FAST],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=helpers.cli_env(columns=160), cwd=ROOT,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while not (partial / "checkpoint" / "state.json").exists():
            assert process.poll() is None, process.communicate()[1]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.2)
        time.sleep(1.0)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "--resume" in stderr and "Traceback" not in stderr
    assert not out.exists()
    state = json.loads((partial / "checkpoint" / "state.json").read_text())
    assert state["step"] >= 0 and state["format"] == "moetool-distill-checkpoint"


def test_help_does_not_import_torch():
    modules = ["moetool.cli", "moetool.cli.distill_cmd"] + [
        f"moetool.distill.{p.stem}" for p in (ROOT / "moetool" / "distill").glob("*.py") if p.stem != "__init__"
    ]
    code = (
        f"import sys, importlib; [importlib.import_module(m) for m in {modules!r}]; "
        "bad = [m for m in ('torch', 'transformers', 'accelerate', 'safetensors.torch') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert run_cli("distill", "--help").returncode == 0
