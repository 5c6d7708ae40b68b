"""moetool-manifest.json, ``moetool verify``, and the file modes set before publishing."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moetool.io.manifest import MANIFEST_NAME, ManifestError, read_manifest, verify_folder, write_manifest
from moetool.io.permissions import apply_umask_modes, umask_modes
from moetool.io.writer import staged_output

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "120"}
    env.pop("MOETOOL_DEBUG", None)
    return subprocess.run(
        [sys.executable, "-m", "moetool", *args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=120
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    out = tmp_path / "out"
    with staged_output(out) as staging:
        # A real safetensors file: every published weight file is read back (NaN/Inf scan).
        save_file({"w": torch.arange(4096, dtype=torch.float32).reshape(64, 64)}, str(staging / "model.safetensors"))
        (staging / "config.json").write_text('{"a": 1}\n')
        (staging / "sub").mkdir()
        (staging / "sub" / "note.txt").write_text("x")
    return out


def test_manifest_lists_every_file_with_its_sha256(folder: Path) -> None:
    document = json.loads((folder / MANIFEST_NAME).read_text())
    assert document["schema_version"] == 1 and document["algorithm"] == "sha256"
    assert set(document["files"]) == {"model.safetensors", "config.json", "sub/note.txt"}
    entry = document["files"]["model.safetensors"]
    data = (folder / "model.safetensors").read_bytes()
    assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert document["versions"]["moetool"]
    assert verify_folder(folder).ok


def test_verify_detects_a_changed_byte(folder: Path) -> None:
    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[1000] ^= 0x40  # same size, one bit flipped
    path.write_bytes(bytes(data))
    result = verify_folder(folder)
    assert not result.ok and result.changed == ["model.safetensors"]
    assert result.missing == [] and result.extra == []


def test_verify_detects_missing_extra_and_truncated_files(folder: Path) -> None:
    (folder / "sub" / "note.txt").unlink()
    (folder / "stray.bin").write_bytes(b"?")
    with open(folder / "config.json", "ab") as handle:
        handle.write(b" ")
    result = verify_folder(folder)
    assert result.missing == ["sub/note.txt"] and result.extra == ["stray.bin"] and result.changed == ["config.json"]


def test_hub_files_are_not_extra(folder: Path) -> None:
    # What a download of a pushed output holds beside the files: the Hub's .gitattributes and the
    # metadata huggingface_hub keeps in local_dir downloads.
    (folder / ".gitattributes").write_text("*.safetensors filter=lfs\n")
    (folder / ".cache" / "huggingface").mkdir(parents=True)
    (folder / ".cache" / "huggingface" / "x.metadata").write_text("1")
    assert verify_folder(folder).ok


def test_unsafe_or_malformed_manifests_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        read_manifest(tmp_path)
    assert info.value.code == "MANIFEST_MISSING"
    for files in ({"../x": {"size": 1, "sha256": "0" * 64}}, {"a": {"size": "1", "sha256": "0" * 64}}, []):
        (tmp_path / MANIFEST_NAME).write_text(json.dumps({"schema_version": 1, "files": files}))
        with pytest.raises(ManifestError):
            read_manifest(tmp_path)


def test_manifest_is_rewritten_not_listed(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("a")
    write_manifest(tmp_path)
    write_manifest(tmp_path)
    assert list(json.loads((tmp_path / MANIFEST_NAME).read_text())["files"]) == ["a"]


def test_verify_cli_exit_codes_and_json(folder: Path) -> None:
    ok = run_cli("verify", str(folder), "--json")
    assert ok.returncode == 0, ok.stderr
    doc = json.loads(ok.stdout)
    assert doc["ok"] is True and doc["files"] == 3 and doc["card"] is None and doc["versions"]["moetool"]
    human = run_cli("verify", str(folder))
    assert human.returncode == 0 and "3 files" in human.stdout

    path = folder / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    bad = run_cli("verify", str(folder), "--json")
    assert bad.returncode == 1
    doc = json.loads(bad.stdout)
    assert doc["ok"] is False and doc["changed"] == ["model.safetensors"]
    assert bad.stderr.strip().startswith("error:") and "1 changed" in bad.stderr and "Traceback" not in bad.stderr
    human = run_cli("verify", str(folder))
    assert human.returncode == 1 and "changed  model.safetensors" in human.stdout


def test_verify_cli_without_a_manifest(tmp_path: Path) -> None:
    result = run_cli("verify", str(tmp_path))
    assert result.returncode == 1 and "has no moetool-manifest.json" in result.stderr


# ------------------------------------------------------------------------------------------------ modes


def test_umask_modes_reads_the_umask_without_changing_it(tmp_path: Path) -> None:
    old = os.umask(0o027)
    try:
        assert umask_modes(tmp_path) == (0o640, 0o750)
        assert os.umask(0o027) == 0o027  # unchanged by the probe
    finally:
        os.umask(old)
    assert list(tmp_path.iterdir()) == []  # the probe file is gone


def test_private_files_become_readable_at_publish(tmp_path: Path) -> None:
    """A library that writes 0600 files (safetensors 0.8's save_file does) still gives 0644 output."""
    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        with staged_output(out) as staging:
            save_file({"w": torch.zeros(4)}, str(staging / "model.safetensors"))
            os.chmod(staging / "model.safetensors", 0o600)
            (staging / "nested").mkdir(mode=0o700)
            (staging / "nested" / "f").write_text("x")
            os.chmod(staging / "nested" / "f", 0o600)
    finally:
        os.umask(old)
    found = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")}
    assert found == {"model.safetensors": 0o644, "nested": 0o755, "f": 0o644, MANIFEST_NAME: 0o644}


def test_safetensors_save_file_mode_is_fixed(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file

    old = os.umask(0o022)
    try:
        save_file({"x": torch.zeros(2)}, str(tmp_path / "w.safetensors"))
        apply_umask_modes(tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "w.safetensors").stat().st_mode) == 0o644
