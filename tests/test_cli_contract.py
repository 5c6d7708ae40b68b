"""What a new user sees: --help without "<bool>" after flags, usage errors as JSON under --json, versions in
every JSON document, -q, and a profile-routing report that fits an 80-column terminal."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from tests.test_data import make_tokenizer
from tests.test_eval import corpus
from tests.tiny import build_tiny

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ["inspect", "profile-routing", "eval", "upcycle", "merge", "distill", "quantize", "verify"]


def run_cli(*args: str, columns: int = 200, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": str(columns), **(env or {})}
    full.pop("MOETOOL_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "moetool", *args], capture_output=True, text=True, env=full, cwd=ROOT, timeout=300
    )


def help_text(*command: str) -> str:
    """--help of one or more commands in one interpreter (faster than one process each)."""
    code = (
        "import sys; from typer.testing import CliRunner; from moetool.cli import app\n"
        "for name in sys.argv[1:]:\n"
        "    args = [name, '--help'] if name else ['--help']\n"
        "    result = CliRunner().invoke(app, args, env={'COLUMNS': '200', 'NO_COLOR': '1'}, terminal_width=200)\n"
        "    print(result.output)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, *command], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_help_shows_no_type_after_flags() -> None:
    text = help_text("", *COMMANDS)
    assert "<bool>" not in text
    assert re.search(r"--json\s+Print one JSON document", text)
    assert "<int>" in text or "<str>" in text  # options that take a value keep their type
    for option in ("--push-to-hub", "--private", "--create-pr"):
        assert text.count(option) >= 4  # merge, quantize, upcycle, distill


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["merge", "examples/tiny-moe", "--json"], "Missing option '--out'"),
        (["inspect", "examples/tiny-moe", "--bogus", "--json"], "No such option: --bogus"),
        (["merge", "examples/tiny-moe", "-o", "x", "--num-experts", "two", "--json"], "--num-experts"),
        (["frobnicate", "--json"], "No such command 'frobnicate'"),
    ],
)
def test_usage_errors_under_json_print_the_error_document(args: list[str], needle: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    error = doc["error"]
    assert error["code"] == "USAGE" and error["exit_code"] == 2 and needle in error["message"] and error["hint"]
    assert doc["versions"]["moetool"]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:")


def test_usage_error_without_json_keeps_typers_message() -> None:
    result = run_cli("merge", "examples/tiny-moe")
    assert result.returncode == 2 and result.stdout == "" and "Missing option" in result.stderr


def test_versions_in_json_without_importing_torch() -> None:
    code = (
        "import sys, json, io, contextlib\n"
        "from moetool.cli import main\n"
        "sys.argv = ['moetool', 'inspect', 'examples/tiny-moe', '--json']\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    try:\n"
        "        main()\n"
        "    except SystemExit as exc:\n"
        "        assert not exc.code, exc.code\n"
        "doc = json.loads(out.getvalue())\n"
        "print(json.dumps([doc['versions'], 'torch' in sys.modules]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    found, torch_imported = json.loads(proc.stdout)
    from importlib.metadata import version

    assert found["torch"] == version("torch") and found["transformers"] == version("transformers")
    assert found["moetool"] and found["python"]
    assert torch_imported is False


# ------------------------------------------------------------------------------------------------ profile


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    model = root / "moe"
    build_tiny("mixtral", model)
    make_tokenizer(path=model)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": d.text, "src": d.domain}) + "\n" for d in corpus()), encoding="utf-8")
    out = root / "routing"
    result = run_cli(
        "profile-routing", str(model), "-d", str(data), "--domain-field", "src", "--seq-len", "16", "--out", str(out),
        columns=80,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return model, data, out, result


def test_table_fits_80_columns(profiled) -> None:
    *_, result = profiled
    lines = result.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80, result.stdout
    assert "…" not in result.stdout  # no squeezed cells or headers
    header = next(line for line in lines if "layer" in line and "CV" in line)
    for column in ("load", "CV", "dead", "drop@1.0"):
        assert column in header
    assert "Not shown at this width" in result.stdout


def test_wide_terminal_shows_every_column(profiled) -> None:
    from moetool.cli.profile_cmd import render
    from moetool.routing.stats import RoutingStats

    *_, out, _ = profiled
    stats = RoutingStats.load(out / "routing-stats.json")
    console = Console(width=200, record=True, color_system=None, file=open(os.devnull, "w"))  # noqa: SIM115
    render(stats, console=console)
    text = console.export_text()
    for column in ("entropy", "max/mean", "Gini", "aux", "z-loss", "drop@1.25", "top-1 p", "margin"):
        assert column in text
    assert "Not shown" not in text


def test_many_experts_are_binned_to_fit(profiled) -> None:
    from moetool.cli.profile_cmd import render
    from moetool.routing.stats import LayerStats, RoutingStats

    experts = 256
    layers = [
        LayerStats(layer=i, tokens=1000, top_k=8, counts=[(e * 7 + i) % 50 for e in range(experts)],
                   prob_mean=[1 / experts] * experts, coactivation=[[0] * experts for _ in range(experts)],
                   dropped={"1.0": 0.1, "1.25": 0.05, "1.5": 0.0, "2.0": 0.0}, z_loss=1.0, top1_prob=0.3,
                   top1_top2_margin=0.1)
        for i in range(3)
    ]  # fmt: skip
    stats = RoutingStats(model="big", model_type="deepseek_v3", family="deepseek_v3", routing="sigmoid",
                         num_experts=256, top_k=8, tokens=1000, layers=layers)  # fmt: skip
    console = Console(width=80, record=True, color_system=None, file=open(os.devnull, "w"))  # noqa: SIM115
    render(stats, console=console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert "load/8e" in text and "one block per 8 experts" in text


def test_report_files_explain_and_record(profiled) -> None:
    *_, out, _ = profiled
    stats = json.loads((out / "routing-stats.json").read_text())
    assert stats["dataset"]["split"] is None  # a local file has no split
    assert stats["versions"]["moetool"]
    page = (out / "report.html").read_text()
    from moetool.routing.report import METRIC_HELP

    assert "What the columns mean" in page
    for name in ("CV", "entropy", "Gini", "aux loss", "drop@1.0", "domain JS"):
        assert f"<dt>{name}</dt>" in page and METRIC_HELP[name][:40].replace("'", "&#x27;") in page
    assert page.count("<figcaption>") == 3


def test_quiet_prints_nothing_but_errors_and_token_offline_are_accepted(profiled) -> None:
    model, data, *_ = profiled
    args = ["profile-routing", str(model), "-d", str(data), "--seq-len", "16", "--offline", "--token", "x"]
    quiet = run_cli("-q", *args)
    assert quiet.returncode == 0 and quiet.stdout == "" and quiet.stderr == ""
    failing = run_cli("-q", "verify", str(model))  # errors still print (no manifest in a source folder)
    assert failing.returncode == 1 and failing.stderr.startswith("error:")
