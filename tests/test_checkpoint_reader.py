"""Tests for moetool.io.checkpoint: folder layouts, cross-shard checks, path safety, pickle refusal.

Bad inputs follow docs CHECKLISTS.md table B (B1-B2, B11-B17 through Checkpoint.open); each test asserts
the exception class and its code.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import moetool.io.checkpoint as ckpt_mod
import moetool.io.safetensors_header as sh
from moetool.errors import (
    CheckpointError,
    ConfigError,
    PickleRefusedError,
    SourceNotFoundError,
    UnsafePathError,
)
from moetool.io.checkpoint import INDEX_NAME, Checkpoint, load_config, resolve_inside
from moetool.io.safetensors_header import read_header

CONFIG = {"model_type": "mixtral", "num_local_experts": 2, "hidden_size": 4}

# --------------------------------------------------------------------------- helpers


def shard_tensors(k: int) -> dict[str, np.ndarray]:
    """Deterministic, distinct tensors for shard ``k``."""
    return {
        f"layers.{k}.w": np.arange(12, dtype=np.float32).reshape(3, 4) + 100 * k,
        f"layers.{k}.b": np.arange(3, dtype=np.float16) - k,
    }


def make_checkpoint(
    folder: Path,
    shards: dict[str, dict[str, np.ndarray]],
    *,
    index: bool = True,
    config: dict | None = None,
) -> Path:
    """Write config.json, the shard files and (optionally) a matching index."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config if config is not None else CONFIG))
    total = 0
    weight_map = {}
    for shard, tensors in shards.items():
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        for name, array in tensors.items():
            weight_map[name] = shard
            total += array.nbytes
    if index:
        write_index(folder, weight_map, total)
    return folder


def write_index(folder: Path, weight_map: dict, total: int | None = None) -> None:
    doc: dict = {"weight_map": weight_map}
    if total is not None:
        doc["metadata"] = {"total_size": total}
    (folder / INDEX_NAME).write_text(json.dumps(doc))


def two_shards(folder: Path, **kwargs) -> Path:
    return make_checkpoint(
        folder,
        {
            "model-00001-of-00002.safetensors": shard_tensors(0),
            "model-00002-of-00002.safetensors": shard_tensors(1),
        },
        **kwargs,
    )


def expect(exc_type: type, code: str, func, *args, **kwargs):
    with pytest.raises(exc_type) as info:
        func(*args, **kwargs)
    assert type(info.value) is exc_type
    assert info.value.code == code, info.value
    assert info.value.hint
    return info.value


class Payload:
    """A pickle whose loading would create a marker file (attacks/torch_ace_create.py style)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture
def no_header_reads(monkeypatch: pytest.MonkeyPatch) -> list:
    """Record every header read Checkpoint.open attempts."""
    calls: list = []

    def spy(path, *, file=None):
        calls.append(path)
        return read_header(path, file=file)

    monkeypatch.setattr(ckpt_mod, "read_header", spy)
    return calls


# --------------------------------------------------------------------------- valid layouts


def test_multi_shard_with_index(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "m")
    ck = Checkpoint.open(folder)
    assert ck.name == str(folder)
    assert ck.config == CONFIG
    assert ck.root == folder
    assert ck.shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert list(ck.tensors) == ["layers.0.w", "layers.0.b", "layers.1.w", "layers.1.b"]
    assert ck.tensors["layers.1.b"].file == "model-00002-of-00002.safetensors"
    assert ck.index_metadata == {"total_size": 2 * (48 + 6)}
    assert ck.warnings == []
    assert ck.has_weights
    assert ck.dtype_bytes() == {"F32": 96, "F16": 12}
    assert ck.total_bytes() == 108


def test_read_tensor_exact_values(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    folder = two_shards(tmp_path / "m")
    ck = Checkpoint.open(folder, name="org/model", revision="abc")
    assert (ck.name, ck.revision) == ("org/model", "abc")
    w = ck.read_tensor("layers.1.w")
    assert w.dtype == torch.float32 and tuple(w.shape) == (3, 4)
    assert torch.equal(w, torch.from_numpy(shard_tensors(1)["layers.1.w"]))
    b = ck.read_tensor("layers.0.b")
    assert b.dtype == torch.float16
    assert torch.equal(b, torch.from_numpy(shard_tensors(0)["layers.0.b"]))


def test_iter_tensors_groups_by_shard(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    folder = two_shards(tmp_path / "m")
    ck = Checkpoint.open(folder)
    got = list(ck.iter_tensors(["layers.1.b", "layers.0.w", "layers.1.w", "layers.0.w"]))
    assert [name for name, _ in got] == ["layers.0.w", "layers.1.b", "layers.1.w"]
    expected = {**shard_tensors(0), **shard_tensors(1)}
    for name, tensor in got:
        assert torch.equal(tensor, torch.from_numpy(expected[name]))
    assert [name for name, _ in ck.iter_tensors()] == list(ck.tensors)


def test_read_tensor_unknown_name(tmp_path: Path) -> None:
    ck = Checkpoint.open(two_shards(tmp_path / "m"))
    expect(CheckpointError, "TENSOR_NOT_FOUND", ck.read_tensor, "nope")
    with pytest.raises(CheckpointError) as info:
        list(ck.iter_tensors(["layers.0.w", "nope"]))
    assert info.value.code == "TENSOR_NOT_FOUND"


def test_read_tensor_after_shard_changed(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    folder = two_shards(tmp_path / "m")
    ck = Checkpoint.open(folder)
    (folder / "model-00002-of-00002.safetensors").write_bytes(b"garbage!" * 4)
    expect(CheckpointError, "SHARD_UNREADABLE", ck.read_tensor, "layers.1.w")


def test_single_file(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m", {"model.safetensors": shard_tensors(0)}, index=False)
    ck = Checkpoint.open(folder)
    assert ck.shards == ["model.safetensors"]
    assert list(ck.tensors) == ["layers.0.w", "layers.0.b"]
    assert ck.index_metadata == {} and ck.warnings == []


def test_shards_without_index_are_globbed_with_warning(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "m", index=False)
    (folder / "._model-00001-of-00002.safetensors").write_bytes(b"macOS debris")
    ck = Checkpoint.open(folder)
    assert ck.shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert len(ck.tensors) == 4
    assert len(ck.warnings) == 1 and "index" in ck.warnings[0]


def test_config_only_checkpoint(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m", {}, index=False)
    ck = Checkpoint.open(folder)
    assert ck.tensors == {} and ck.shards == []
    assert not ck.has_weights
    assert ck.total_bytes() == 0 and ck.dtype_bytes() == {}
    assert ck.warnings


def test_open_reads_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = make_checkpoint(tmp_path / "m", {"model.safetensors": {"big": np.zeros((512, 512), dtype=np.float32)}})
    read = []
    real_open = open

    class Spy:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def fileno(self):
            return self.fh.fileno()

        def read(self, size=-1):
            data = self.fh.read(size)
            read.append(len(data))
            return data

    monkeypatch.setattr(sh, "open", lambda *a, **k: Spy(real_open(*a, **k)), raising=False)
    ck = Checkpoint.open(folder)
    assert ck.total_bytes() == 512 * 512 * 4
    assert sum(read) < 1024


def test_import_does_not_load_torch() -> None:
    code = (
        "import sys, moetool.io.checkpoint, moetool.io.safetensors_header\n"
        "heavy = [m for m in ('torch', 'numpy', 'transformers', 'safetensors') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- source and config


def test_folder_missing_or_not_a_folder(tmp_path: Path) -> None:
    err = expect(SourceNotFoundError, "SOURCE_NOT_FOUND", Checkpoint.open, tmp_path / "absent")
    assert "Hub repo id" in err.hint
    (tmp_path / "file").write_text("x")
    expect(SourceNotFoundError, "SOURCE_NOT_FOUND", Checkpoint.open, tmp_path / "file")


def test_config_missing(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "m")
    (folder / "config.json").unlink()
    expect(ConfigError, "CONFIG_MISSING", Checkpoint.open, folder)


@pytest.mark.parametrize(
    "content",
    [b"{", b"[1, 2]", b'{"a": 1, "a": 2}', b'{"a": NaN}', b"\xff\xfe", b"[" * 100_000],
)
def test_config_invalid(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "config.json").write_bytes(content)
    expect(ConfigError, "CONFIG_INVALID", load_config, tmp_path)


def test_config_symlink_outside_refused(tmp_path: Path) -> None:
    (tmp_path / "m").mkdir()
    (tmp_path / "secret.json").write_text("{}")
    (tmp_path / "m" / "config.json").symlink_to(tmp_path / "secret.json")
    expect(UnsafePathError, "UNSAFE_PATH", load_config, tmp_path / "m")


# --------------------------------------------------------------------------- B1, B2 through open()


def test_b1_truncated_shard_in_checkpoint(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "m")
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-2])
    err = expect(CheckpointError, "SHARD_TRUNCATED", Checkpoint.open, folder)
    assert "model-00002-of-00002.safetensors" in err.message


def test_b2_trailing_data_in_checkpoint(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "m")
    with (folder / "model-00001-of-00002.safetensors").open("ab") as fh:
        fh.write(b"extra")
    expect(CheckpointError, "SHARD_TRAILING_DATA", Checkpoint.open, folder)


# --------------------------------------------------------------------------- B11-B13: shards and index


def test_b11_same_tensor_in_two_shards(tmp_path: Path) -> None:
    folder = make_checkpoint(
        tmp_path / "m",
        {
            "model-00001-of-00002.safetensors": {"x": np.zeros(2, np.float32)},
            "model-00002-of-00002.safetensors": {"x": np.ones(2, np.float32)},
        },
        index=False,
    )
    err = expect(CheckpointError, "DUPLICATE_TENSOR", Checkpoint.open, folder)
    assert "'x'" in err.message and "00001" in err.message and "00002" in err.message


def test_b11_duplicate_key_in_index(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "m")
    (folder / INDEX_NAME).write_text(
        '{"weight_map": {"layers.0.w": "model-00001-of-00002.safetensors",'
        ' "layers.0.w": "model-00002-of-00002.safetensors"}}'
    )
    err = expect(CheckpointError, "INDEX_INVALID", Checkpoint.open, folder)
    assert "duplicate" in err.message


def test_b12_missing_shards_all_listed(tmp_path: Path, no_header_reads: list) -> None:
    folder = make_checkpoint(
        tmp_path / "m", {f"model-0000{k}-of-00003.safetensors": shard_tensors(k) for k in (1, 2, 3)}
    )
    (folder / "model-00001-of-00003.safetensors").unlink()
    (folder / "model-00003-of-00003.safetensors").unlink()
    err = expect(CheckpointError, "SHARD_MISSING", Checkpoint.open, folder)
    assert "model-00001-of-00003.safetensors" in err.message
    assert "model-00003-of-00003.safetensors" in err.message
    assert "00002" not in err.message
    assert no_header_reads == []  # checked before any shard is parsed


def test_b13_index_maps_tensor_to_wrong_shard(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "m")
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"]["layers.0.w"] = "model-00002-of-00002.safetensors"
    (folder / INDEX_NAME).write_text(json.dumps(index))
    err = expect(CheckpointError, "INDEX_MISMATCH", Checkpoint.open, folder)
    assert "'layers.0.w'" in err.message


def test_b13_index_lists_tensor_no_shard_has(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "m")
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"]["layers.9.w"] = "model-00001-of-00002.safetensors"
    (folder / INDEX_NAME).write_text(json.dumps(index))
    err = expect(CheckpointError, "INDEX_MISMATCH", Checkpoint.open, folder)
    assert "'layers.9.w'" in err.message


def test_b13_shard_holds_tensors_absent_from_index(tmp_path: Path) -> None:
    extra = {f"extra.{i}": np.zeros(1, np.float32) for i in range(8)}
    folder = make_checkpoint(tmp_path / "m", {"model-00001-of-00001.safetensors": {**shard_tensors(0), **extra}})
    write_index(folder, dict.fromkeys(shard_tensors(0), "model-00001-of-00001.safetensors"))
    err = expect(CheckpointError, "INDEX_MISMATCH", Checkpoint.open, folder)
    assert "8 place(s)" in err.message
    assert "and 3 more" in err.message
    assert err.message.count("not in the index") == 5


def test_b13_wrong_total_size_is_a_warning(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "m")
    index = json.loads((folder / INDEX_NAME).read_text())
    index["metadata"]["total_size"] = 12345
    (folder / INDEX_NAME).write_text(json.dumps(index))
    ck = Checkpoint.open(folder)
    assert len(ck.warnings) == 1
    assert "12345" in ck.warnings[0] and "108" in ck.warnings[0]


@pytest.mark.parametrize(
    "content",
    [
        "{",
        "[]",
        "{}",
        '{"weight_map": []}',
        '{"weight_map": {}}',
        '{"weight_map": {"x": 1}}',
        '{"weight_map": {"x": "a.safetensors"}, "metadata": []}',
    ],
)
def test_invalid_index(tmp_path: Path, content: str) -> None:
    folder = two_shards(tmp_path / "m")
    (folder / INDEX_NAME).write_text(content)
    expect(CheckpointError, "INDEX_INVALID", Checkpoint.open, folder)


# --------------------------------------------------------------------------- B14: unsafe names


@pytest.mark.parametrize(
    "name",
    [
        "../outside.safetensors",
        "../../etc/passwd",
        "sub/../../outside.safetensors",
        "/tmp/x.safetensors",
        "\\\\host\\share\\x.safetensors",
        "sub\\x.safetensors",
        "C:x.safetensors",
        "c:/x.safetensors",
        "",
        "a\x00b.safetensors",
        "a//b.safetensors",
    ],
)
def test_b14_unsafe_index_names(tmp_path: Path, name: str, no_header_reads: list) -> None:
    # A valid file sits at the traversal target: refusing must not depend on it being unreadable.
    save_file({"x": np.zeros(1, np.float32)}, str(tmp_path / "outside.safetensors"))
    folder = make_checkpoint(tmp_path / "m", {"model.safetensors": {"x": np.zeros(1, np.float32)}})
    write_index(folder, {"x": name})
    expect(UnsafePathError, "UNSAFE_PATH", Checkpoint.open, folder)
    assert no_header_reads == []


def test_b14_resolve_inside_unit(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    assert resolve_inside(tmp_path, "sub/a.safetensors") == (tmp_path / "sub" / "a.safetensors").resolve()
    for bad in ("../x", "/etc/passwd", "\\\\h\\s", "C:x", "", "x\x00"):
        with pytest.raises(UnsafePathError):
            resolve_inside(tmp_path, bad)


def test_b14_index_symlinked_outside(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "m")
    os.replace(folder / INDEX_NAME, tmp_path / "elsewhere.json")
    (folder / INDEX_NAME).symlink_to(tmp_path / "elsewhere.json")
    expect(UnsafePathError, "UNSAFE_PATH", Checkpoint.open, folder)


# --------------------------------------------------------------------------- B15, B16: pickle


def test_b15_index_pointing_to_pickle_shard(tmp_path: Path, no_header_reads: list) -> None:
    marker = tmp_path / "pwned"
    folder = make_checkpoint(tmp_path / "m", {"model.safetensors": {"x": np.zeros(1, np.float32)}})
    (folder / "pytorch_model-0001.bin").write_bytes(pickle.dumps(Payload(marker)))
    write_index(folder, {"x": "pytorch_model-0001.bin"})
    err = expect(PickleRefusedError, "PICKLE_REFUSED", Checkpoint.open, folder)
    assert "pytorch_model-0001.bin" in err.message
    assert not marker.exists()
    assert no_header_reads == []


def test_b16_pickle_only_folder_payload_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    folder = make_checkpoint(tmp_path / "m", {}, index=False)
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"w": Payload(marker)}))
    err = expect(PickleRefusedError, "PICKLE_REFUSED", Checkpoint.open, folder)
    assert "pytorch_model.bin" in err.message
    assert "safetensors" in err.hint and "never unpickles" in err.hint
    assert not marker.exists()


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "last.ckpt", "state.pkl"])
def test_b16_other_pickle_suffixes(tmp_path: Path, name: str) -> None:
    torch = pytest.importorskip("torch")
    folder = make_checkpoint(tmp_path / "m", {}, index=False)
    torch.save({"w": torch.zeros(2)}, folder / name)
    expect(PickleRefusedError, "PICKLE_REFUSED", Checkpoint.open, folder)


# --------------------------------------------------------------------------- B17: symlinks


def hf_cache_repo(cache: Path, repo: str = "models--org--name", rev: str = "0123abcd") -> Path:
    """Build an HF cache layout: snapshots/<rev>/<file> -> ../../blobs/<hash> relative symlinks."""
    staging = make_checkpoint(cache / "staging", {"model.safetensors": shard_tensors(0)})
    blobs = cache / repo / "blobs"
    snapshot = cache / repo / "snapshots" / rev
    blobs.mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, path in enumerate(sorted(staging.iterdir())):
        os.replace(path, blobs / f"hash{i}")
        (snapshot / path.name).symlink_to(Path("..", "..", "blobs", f"hash{i}"))
    return snapshot


def test_b17_hf_cache_snapshot_accepted(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    snapshot = hf_cache_repo(tmp_path / "hub")
    ck = Checkpoint.open(snapshot)
    assert ck.shards == ["model.safetensors"]
    assert ck.tensors["layers.0.w"].file == "model.safetensors"
    assert torch.equal(ck.read_tensor("layers.0.w"), torch.from_numpy(shard_tensors(0)["layers.0.w"]))


def test_b17_symlink_into_other_repo_blobs_refused(tmp_path: Path) -> None:
    snapshot = hf_cache_repo(tmp_path / "hub")
    other = hf_cache_repo(tmp_path / "hub2", repo="models--evil--repo")
    target = (other / "model.safetensors").resolve()
    (snapshot / "model.safetensors").unlink()
    (snapshot / "model.safetensors").symlink_to(target)
    expect(UnsafePathError, "UNSAFE_PATH", Checkpoint.open, snapshot)


@pytest.mark.parametrize("target", ["/etc/hostname", "outside"])
def test_b17_shard_symlink_outside_refused(tmp_path: Path, target: str, no_header_reads: list) -> None:
    if target == "outside":
        target_path = tmp_path / "outside.safetensors"
        save_file({"x": np.zeros(1, np.float32)}, str(target_path))
    else:
        target_path = Path(target)
        if not target_path.exists():
            pytest.skip("no /etc/hostname here")
    folder = make_checkpoint(tmp_path / "m", {}, index=False)
    (folder / "model-00001-of-00001.safetensors").symlink_to(target_path)
    err = expect(UnsafePathError, "UNSAFE_PATH", Checkpoint.open, folder)
    assert "outside the model folder" in err.message
    assert no_header_reads == []


def test_b17_symlink_loop_refused(tmp_path: Path) -> None:
    folder = make_checkpoint(tmp_path / "m", {}, index=False)
    (folder / "a.safetensors").symlink_to("b.safetensors")
    (folder / "b.safetensors").symlink_to("a.safetensors")
    expect(UnsafePathError, "UNSAFE_PATH", Checkpoint.open, folder)


def test_b17_symlink_within_folder_accepted(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    (folder / "store").mkdir(parents=True)
    save_file(shard_tensors(0), str(folder / "store" / "data.safetensors"))
    (folder / "config.json").write_text(json.dumps(CONFIG))
    (folder / "model.safetensors").symlink_to(Path("store", "data.safetensors"))
    assert list(Checkpoint.open(folder).tensors) == ["layers.0.w", "layers.0.b"]


# --------------------------------------------------------------------------- from_headers (remote)


def headers_of(folder: Path) -> list:
    return [read_header(p, file=p.name) for p in sorted(folder.glob("*.safetensors"))]


def test_from_headers_remote_checkpoint(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "m")
    index = json.loads((folder / INDEX_NAME).read_text())
    ck = Checkpoint.from_headers(
        name="org/model", config=CONFIG, headers=headers_of(folder), revision="f" * 40, index=index
    )
    assert ck.root is None and ck.revision == "f" * 40
    assert list(ck.tensors) == ["layers.0.w", "layers.0.b", "layers.1.w", "layers.1.b"]
    assert ck.total_bytes() == 108
    expect(CheckpointError, "NO_LOCAL_WEIGHTS", ck.read_tensor, "layers.0.w")


def test_from_headers_runs_cross_shard_checks(tmp_path: Path) -> None:
    folder = two_shards(tmp_path / "m")
    index = json.loads((folder / INDEX_NAME).read_text())
    headers = headers_of(folder)
    expect(
        CheckpointError,
        "DUPLICATE_TENSOR",
        Checkpoint.from_headers,
        name="r",
        config=CONFIG,
        headers=[headers[0], headers[0]],
    )
    expect(
        CheckpointError,
        "SHARD_MISSING",
        Checkpoint.from_headers,
        name="r",
        config=CONFIG,
        headers=headers[:1],
        index=index,
    )
    index["weight_map"]["layers.0.b"] = "model-00002-of-00002.safetensors"
    expect(
        CheckpointError,
        "INDEX_MISMATCH",
        Checkpoint.from_headers,
        name="r",
        config=CONFIG,
        headers=headers,
        index=index,
    )
    bad = {"weight_map": {"x": "../../etc/passwd"}}
    expect(
        UnsafePathError,
        "UNSAFE_PATH",
        Checkpoint.from_headers,
        name="r",
        config=CONFIG,
        headers=[],
        index=bad,
    )
