"""The CPU thread policy: --threads, OMP_NUM_THREADS, idle cores; every torch command takes and records it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moetool import threads as policy
from tests.test_data import make_tokenizer
from tests.test_eval import corpus
from tests.tiny import build_tiny

COMMANDS = ("profile-routing", "eval", "upcycle", "merge", "distill", "quantize")


@pytest.fixture
def no_env(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)


def fake_cpu(monkeypatch, *, cores: int, busy_cores: float, quota: float | None = None):
    """Pretend this process may use ``cores`` CPUs of which others keep ``busy_cores`` busy."""
    monkeypatch.setattr(policy.os, "sched_getaffinity", lambda _pid: set(range(cores)))
    monkeypatch.setattr(policy, "_cgroup_quota", lambda: quota)
    samples = iter([(0, 0), (int(busy_cores * 100), cores * 100)])
    monkeypatch.setattr(policy, "_cpu_times", lambda _cpus: next(samples))
    monkeypatch.setattr(policy.time, "sleep", lambda _s: None)


@pytest.mark.parametrize(
    ("cores", "busy", "expected"),
    [(2, 0.0, 2), (2, 1.0, 1), (2, 2.0, 1), (2, 0.4, 2), (2, 0.6, 1), (16, 3.2, 13), (1, 0.0, 1)],
)
def test_idle_cores_pick_the_count(monkeypatch, no_env, cores, busy, expected):
    fake_cpu(monkeypatch, cores=cores, busy_cores=busy)
    choice = policy.choose_threads(0)
    assert choice.threads == expected and choice.source == "idle cores" and choice.cores == cores
    assert "idle cores" in choice.describe()


def test_processes_of_one_launch_share_the_idle_cores(monkeypatch, no_env):
    fake_cpu(monkeypatch, cores=16, busy_cores=0.0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert policy.choose_threads(0).threads == 4


def test_cgroup_quota_caps_the_cores(monkeypatch, no_env):
    fake_cpu(monkeypatch, cores=64, busy_cores=0.0, quota=2.0)
    assert policy.usable_cores() == 2
    assert policy.choose_threads(0).threads == 2


def test_explicit_count_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    choice = policy.choose_threads(3)
    assert (choice.threads, choice.source) == (3, "--threads")


def test_omp_num_threads_is_kept(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    choice = policy.choose_threads(0)
    assert (choice.threads, choice.source) == (1, "OMP_NUM_THREADS")
    assert choice.describe() == "1 CPU thread (OMP_NUM_THREADS=1)"


@pytest.mark.parametrize("value", ["", "zero", "0", "-2"])
def test_unusable_omp_num_threads_is_ignored(monkeypatch, value):
    monkeypatch.setenv("OMP_NUM_THREADS", value)
    fake_cpu(monkeypatch, cores=2, busy_cores=1.0)
    assert policy.choose_threads(0).source == "idle cores"


def test_real_proc_stat_sample(no_env):
    """On this machine: a count between 1 and the usable cores."""
    idle = policy.idle_cores(0.02)
    assert 0.0 <= idle <= policy.usable_cores()
    assert 1 <= policy.choose_threads(0).threads <= policy.usable_cores()


def test_apply_and_restore():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert policy.apply_threads(2).threads == 2 and torch.get_num_threads() == 2
        policy.apply_threads(3)
        policy.restore_threads()
        assert torch.get_num_threads() == 1
        policy.restore_threads()  # nothing left to undo
        assert torch.get_num_threads() == 1
        with policy.thread_count(2):
            assert torch.get_num_threads() == 2
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def invoke(*args: str):
    from moetool.cli import app

    return CliRunner().invoke(app, list(args), env={"HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "120"})


@pytest.mark.parametrize("command", COMMANDS)
def test_every_torch_command_takes_threads(command):
    result = invoke(command, "--help")
    assert result.exit_code == 0 and "--threads" in result.stdout


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("threads")
    build_tiny("mixtral", root / "moe")
    make_tokenizer(path=root / "moe")
    build_tiny("llama", root / "dense")
    make_tokenizer(path=root / "dense")
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"text": d.text}) + "\n" for d in corpus(40)), encoding="utf-8")
    return {"moe": root / "moe", "dense": root / "dense", "data": data, "root": root}


def _args(command: str, tiny: dict[str, Path], out: Path) -> list[str]:
    moe, data = str(tiny["moe"]), str(tiny["data"])
    small = ["--max-tokens", "256", "--seq-len", "32"]
    return {
        "profile-routing": [moe, "-d", data, *small],
        "eval": [moe, "-d", data, *small],
        "quantize": [moe, "-o", str(out), "--method", "rtn", "-g", "16", "--no-verify"],
        "merge": [moe, "-o", str(out), "--num-experts", "2", "--method", "frequency", "-d", data, *small, "--no-eval"],
        "upcycle": [str(tiny["dense"]), "-o", str(out), "-e", "4", "-k", "2", "--no-verify"],
    }[command]


@pytest.mark.parametrize("command", ["profile-routing", "eval", "quantize", "merge", "upcycle"])
def test_json_records_the_count_and_the_caller_keeps_its_own(tiny, tmp_path, command):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        result = invoke(command, *_args(command, tiny, tmp_path / "out"), "--threads", "2", "--json")
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["threads"] == 2
        assert torch.get_num_threads() == 1  # restored when the command ended
    finally:
        torch.set_num_threads(before)


def test_upcycle_dry_run_sets_no_threads(tiny, tmp_path):
    out = str(tmp_path / "x")
    result = invoke("upcycle", str(tiny["dense"]), "-o", out, "-e", "4", "-k", "2", "--dry-run", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["threads"] is None
