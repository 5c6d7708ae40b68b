"""Faults and bad weights (issue 14): NaN/Inf, killed runs' leftovers, full disks, inputs that change
mid-run (SIGBUS), remote code in outputs.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from typer.testing import CliRunner

from moetool.cli import app
from moetool.errors import InputChangedError, MoetoolWarning, NonfiniteError
from moetool.io.checkpoint import Checkpoint
from moetool.io.nonfinite import scan_checkpoint, scan_file
from moetool.io.writer import DiskFullError, staged_output
from moetool.validate import check_input
from tests.malformed import EXPERT, ROOT, SHARD, TINY_MOE, copy_checkpoint, edit_config, put_nonfinite, snapshot

DATA = ROOT / "examples" / "data" / "heldout.jsonl"
FAST_MERGE = ["-n", "4", "-d", str(DATA), "--max-tokens", "256", "--method", "frequency", "--no-eval"]
ENV = {"NO_COLOR": "1", "COLUMNS": "200", "HF_HUB_OFFLINE": "1"}
BAD = EXPERT.format(L=1, E=2, P="w3")


def run(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], env=ENV)


def one_error_line(result, *needles: str, code: int = 1) -> str:
    err = result.stderr
    assert result.exit_code == code, (result.exit_code, err)
    assert "Traceback" not in err and "internal error" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert all(n in lines[0] for n in needles), lines[0]
    return lines[0]


@pytest.fixture
def nan_model(tmp_path: Path) -> Path:
    return put_nonfinite(copy_checkpoint(tmp_path / "nan-model"), BAD, nan=2, inf=1)


def save(folder: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


# ----------------------------------------------------------------------------- NaN / Inf (B25)


def test_scan_counts_nan_and_inf_per_tensor(nan_model: Path) -> None:
    [hit] = scan_checkpoint(Checkpoint.open(nan_model))
    assert (hit.tensor, hit.nan, hit.inf) == (BAD, 2, 1)
    assert scan_checkpoint(Checkpoint.open(TINY_MOE)) == []


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64", "float8_e5m2", "float8_e4m3fn"])
def test_scan_reads_every_float_format(tmp_path: Path, dtype: str) -> None:
    import torch

    values = torch.zeros(1000, dtype=torch.float32)
    values[[3, 500]] = float("nan")
    inf = dtype != "float8_e4m3fn"  # e4m3fn has no infinity
    if inf:
        values[[7, 8, 999]] = torch.tensor([float("inf"), float("-inf"), float("inf")])
    save(tmp_path, {"x": values.to(getattr(torch, dtype)), "ints": torch.full((9,), -1, dtype=torch.int32)})
    [hit] = scan_file(tmp_path / "model.safetensors")
    assert (hit.tensor, hit.nan, hit.inf) == ("x", 2, 3 if inf else 0)


def test_scan_works_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    import moetool.io.nonfinite as nonfinite

    monkeypatch.setattr(nonfinite, "CHUNK_BYTES", 64)
    values = torch.arange(1001, dtype=torch.float32)
    values[::100] = float("nan")
    save(tmp_path, {"x": values})
    assert scan_file(tmp_path / "model.safetensors")[0].nan == 11


def test_scan_notices_a_file_that_shrank(nan_model: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    checkpoint = Checkpoint.open(nan_model)
    with open(nan_model / SHARD, "r+b") as handle:
        handle.truncate(os.path.getsize(nan_model / SHARD) - 4)
    with pytest.raises(InputChangedError):
        scan_checkpoint(checkpoint)


def test_inspect_scan_nonfinite(nan_model: Path) -> None:
    result = run("inspect", nan_model, "--scan-nonfinite")
    assert result.exit_code == 0
    assert "Non-finite values" in result.stdout and "experts.2.w3.weight" in result.stdout
    assert "warning: 1 tensor(s) hold NaN/Inf" in result.stderr
    document = json.loads(run("inspect", nan_model, "--scan-nonfinite", "--json").stdout)
    assert document["nonfinite"] == [{"tensor": BAD, "file": SHARD, "nan": 2, "inf": 1}]
    assert json.loads(run("inspect", TINY_MOE, "--json").stdout)["nonfinite"] is None
    strict = run("inspect", nan_model, "--scan-nonfinite", "--strict", "--json")
    one_error_line(strict, "NaN")
    assert json.loads(strict.stdout)["nonfinite"]  # the report is still printed, as one document
    assert "no NaN or Inf" in run("inspect", TINY_MOE, "--scan-nonfinite").stdout
    one_error_line(run("inspect", TINY_MOE, "--config-only", "--scan-nonfinite"), "--scan-nonfinite", code=2)


@pytest.mark.parametrize(
    "command",
    [
        ["merge", "{m}", "-o", "{o}", "-n", "4", "-d", str(DATA)],
        ["quantize", "{m}", "-o", "{o}", "--method", "rtn"],
        ["distill", "{m}", "-o", "{o}", "-d", str(DATA), "--steps", "1"],
    ],
    ids=["merge", "quantize", "distill"],
)
def test_write_commands_refuse_nonfinite_inputs(nan_model: Path, tmp_path: Path, command: list[str]) -> None:
    before = snapshot(nan_model)
    out = tmp_path / "out"
    result = run(*[a.format(m=nan_model, o=out) for a in command], "--json")
    one_error_line(result, "experts.2.w3.weight", "2 NaN and 1 Inf", "--allow-nonfinite")
    assert json.loads(result.stdout)["error"]["code"] == "NONFINITE_WEIGHTS"
    assert not out.exists() and snapshot(nan_model) == before


def test_upcycle_refuses_a_dense_model_with_nan(tmp_path: Path) -> None:
    from tests.tiny import build_tiny

    dense = tmp_path / "dense"
    build_tiny("mistral", dense)
    put_nonfinite(dense, "model.layers.1.mlp.down_proj.weight", nan=1, inf=0)
    result = run("upcycle", dense, "-o", tmp_path / "moe", "--num-experts", "4", "--top-k", "2")
    one_error_line(result, "down_proj", "1 NaN")
    assert not (tmp_path / "moe").exists()


def test_allow_nonfinite_lets_the_input_through_and_reports_it(nan_model: Path) -> None:
    with pytest.warns(MoetoolWarning, match="--allow-nonfinite"):
        result = check_input(Checkpoint.open(nan_model), allow_nonfinite=True, transformers_config=False)
    assert [hit.tensor for hit in result.nonfinite] == [BAD]
    with pytest.raises(NonfiniteError) as info:
        check_input(Checkpoint.open(nan_model), transformers_config=False)
    assert info.value.code == "NONFINITE_WEIGHTS"


def test_outputs_are_scanned_before_publishing(tmp_path: Path) -> None:
    import torch

    out = tmp_path / "out"
    with pytest.raises(NonfiniteError) as info, staged_output(out) as staging:
        save(staging, {"w": torch.tensor([1.0, float("nan")])})
    assert info.value.code == "NONFINITE_OUTPUT"
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".moetool")]
    with pytest.warns(MoetoolWarning, match="in the output"), staged_output(out, allow_nonfinite=True) as staging:
        save(staging, {"w": torch.tensor([1.0, float("inf")])})
    assert (out / "model.safetensors").is_file()


# ----------------------------------------------------------------------------- remote code in outputs


def test_auto_map_is_dropped_from_outputs_with_a_warning(tmp_path: Path) -> None:
    out = tmp_path / "out"
    config = {"model_type": "mixtral", "auto_map": {"AutoModelForCausalLM": "modeling_x.X"}}
    with pytest.warns(MoetoolWarning, match="dropped auto_map"), staged_output(out) as staging:
        (staging / "config.json").write_text(json.dumps(config))
    assert json.loads((out / "config.json").read_text()) == {"model_type": "mixtral"}


# ----------------------------------------------------------------------------- killed runs (B34)


def _leftover(parent: Path, prefix: str, name: str, pid: int = 999_999_999) -> Path:
    path = parent / f"{prefix}{name}-{pid}-deadbeef"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"x" * 1000)
    return path


def test_leftovers_of_a_killed_run_are_removed_with_a_warning(tmp_path: Path) -> None:
    staging = _leftover(tmp_path, ".moetool-tmp-", "out")
    other = _leftover(tmp_path, ".moetool-tmp-", "out-2")  # another output's: not ours to judge
    (tmp_path / ".moetool-lock-out").write_text("999999999\n" + os.uname().nodename + "\n")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with staged_output(tmp_path / "out") as stage:
            (stage / "a").write_text("a")
    messages = [str(w.message) for w in caught if issubclass(w.category, MoetoolWarning)]
    assert any("stale lock" in m and "999999999" in m for m in messages), messages
    assert any(staging.name in m and "1,000 bytes" in m for m in messages), messages
    assert not staging.exists() and other.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["out", other.name])


def test_an_earlier_output_moved_aside_is_kept_when_it_is_the_only_copy(tmp_path: Path) -> None:
    aside = _leftover(tmp_path, ".moetool-old-", "out")
    with pytest.warns(MoetoolWarning, match="was kept"), staged_output(tmp_path / "out") as stage:
        (stage / "a").write_text("a")
    assert aside.exists()
    with pytest.warns(MoetoolWarning, match="replaced output"), staged_output(tmp_path / "out", overwrite=True) as s:
        (s / "b").write_text("b")
    assert not aside.exists()


def test_a_real_command_after_kill_9_and_with_remote_code(tmp_path: Path) -> None:
    """What a user sees after kill -9: the next run says what it removed, one warning line each; and
    the input's auto_map does not reach the output (one merge run checks both: it is the slow part)."""
    model = edit_config(copy_checkpoint(tmp_path / "m"), auto_map={"AutoModelForCausalLM": "modeling_x.X"})
    staging = _leftover(tmp_path, ".moetool-tmp-", "out")
    (tmp_path / ".moetool-lock-out").write_text("999999999\n")
    out = tmp_path / "out"
    result = run("merge", model, "-o", out, *FAST_MERGE)
    assert result.exit_code == 0, result.stderr
    assert f"warning: removed {staging.name}" in result.stderr
    assert "warning: removed the stale lock" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m", "out"]
    assert "warning: dropped auto_map (AutoModelForCausalLM)" in result.stderr
    assert "auto_map" not in json.loads((out / "config.json").read_text())


# ----------------------------------------------------------------------------- full disks (B33)


def _enospc(*_args, **_kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_full_disk_at_the_lock_leaves_no_empty_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import moetool.io.writer as writer

    monkeypatch.setattr(writer, "_lock_text", _enospc)
    with pytest.raises(DiskFullError, match="bytes free"), staged_output(tmp_path / "out"):
        pass
    assert list(tmp_path.iterdir()) == []


def test_full_disk_while_writing(tmp_path: Path) -> None:
    with pytest.raises(DiskFullError) as info, staged_output(tmp_path / "out") as staging:
        (staging / "part").write_bytes(b"x" * 5000)
        _enospc()
    assert "5,000 bytes were written" in info.value.message and "free" in info.value.message
    assert info.value.exit_code == 1
    assert list(tmp_path.iterdir()) == []


def test_full_disk_is_preflighted(tmp_path: Path) -> None:
    needs = "needs 10,000,000,000,000,000,000,000 bytes"
    with pytest.raises(DiskFullError, match=needs), staged_output(tmp_path / "out", expected_bytes=10**22):
        pytest.fail("the block must not run")
    assert list(tmp_path.iterdir()) == []


def test_profile_routing_on_a_full_disk_exits_1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import moetool.io.writer as writer

    monkeypatch.setattr(writer, "_lock_text", _enospc)
    result = run("profile-routing", TINY_MOE, "-d", DATA, "--max-tokens", "128", "--out", tmp_path / "stats")
    one_error_line(result, "disk full")
    assert list(tmp_path.iterdir()) == []


def test_quantize_preflights_its_output_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import moetool.io.writer as writer

    real = shutil.disk_usage
    monkeypatch.setattr(writer.shutil, "disk_usage", lambda p: real(p)._replace(free=1_000_000))
    result = run("quantize", TINY_MOE, "-o", tmp_path / "q", "--method", "rtn", "--bits", "4")
    line = one_error_line(result, "not enough disk space for the quantized model", "1,000,000 free")
    needed = int(line.split("needs ")[1].split(" bytes")[0].replace(",", ""))
    assert 4_000_000 < needed < 12_000_000  # 4-bit experts + float32 rest of a 19.6 MB model
    assert list(tmp_path.iterdir()) == []


def test_quantize_size_estimate_covers_what_is_written() -> None:
    from moetool.io.sizes import estimate_quantized_bytes
    from moetool.quantize.storage import QuantFormat

    checkpoint = Checkpoint.open(TINY_MOE)
    experts = {n for n in checkpoint.tensors if ".experts." in n}
    fmt = QuantFormat(scheme="uniform", bits=4, group_size=128)
    estimate = estimate_quantized_bytes(checkpoint, experts, fmt)
    others = sum(i.nbytes for n, i in checkpoint.tensors.items() if n not in experts)
    numel = sum(i.numel for n, i in checkpoint.tensors.items() if n in experts)
    assert others + numel // 2 < estimate < others + numel // 2 * 1.1 + 2**21


# ----------------------------------------------------------------------------- inputs that change (B36)


def test_an_input_that_changes_during_the_run_is_refused(tmp_path: Path) -> None:
    model = copy_checkpoint(tmp_path / "m")
    out = tmp_path / "out"
    with pytest.raises(InputChangedError, match="changed while being read"), staged_output(out, inputs=[model]) as s:
        (s / "a").write_text("a")
        with open(model / SHARD, "ab") as handle:
            handle.write(b"\0")
    assert not out.exists()


SIGBUS_UNIT = """
import mmap, os, sys
from pathlib import Path
from moetool.cli._faults import install_fault_handlers
from moetool.io.writer import staged_output
assert install_fault_handlers()
data = Path(sys.argv[1]) / "input.bin"
data.write_bytes(b"x" * (1 << 20))
with staged_output(Path(sys.argv[1]) / "out") as staging:
    (staging / "partial").write_bytes(b"y" * 1000)
    with open(data, "rb") as handle:
        view = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        os.truncate(data, 10)
        print(view[600_000])
print("NOT REACHED")
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigbus_is_one_line_and_cleans_up(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-c", SIGBUS_UNIT, str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 1, result
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: an input file changed while being read")
    assert "NOT REACHED" not in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["input.bin"]  # no staging folder, no lock


SIGBUS_COMMAND = """
import os, sys
import safetensors
real = safetensors.safe_open

class Truncating:
    # moetool's reader, with the shard truncated once, after it was opened (mapped), before a read.
    done = False

    def __init__(self, path, handle):
        self.path, self.handle = path, handle
    def __enter__(self):
        self.handle.__enter__()
        return self
    def __exit__(self, *exc):
        return self.handle.__exit__(*exc)
    def __getattr__(self, name):
        return getattr(self.handle, name)
    def get_tensor(self, name):
        if not Truncating.done:
            Truncating.done = True
            os.truncate(self.path, 4096)
        return self.handle.get_tensor(name)

def safe_open(path, *args, **kwargs):
    handle = real(path, *args, **kwargs)
    if sys._getframe(1).f_globals.get("__name__") != "moetool.io.checkpoint":
        return handle  # transformers' own loading stays as it is
    return Truncating(path, handle)

safetensors.safe_open = safe_open
sys.argv = ["moetool", *sys.argv[1:]]
from moetool.cli import main
main()
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_input_truncated_during_a_real_command(tmp_path: Path) -> None:
    model = copy_checkpoint(tmp_path / "m")
    out = tmp_path / "out"
    args = ["quantize", str(model), "-o", str(out), "--method", "rtn", "--no-verify"]
    result = subprocess.run(
        [sys.executable, "-c", SIGBUS_COMMAND, *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert result.returncode == 1, (result.returncode, result.stderr[-3000:])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "changed while being read" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no output, staging folder or lock
