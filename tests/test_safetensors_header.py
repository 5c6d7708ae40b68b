"""Tests for moetool.io.safetensors_header: valid files parse, every malformed header is refused.

Bad inputs follow docs CHECKLISTS.md table B (B1-B11); each test asserts the exception class and its code.
Fixtures are written with safetensors itself, then corrupted by hand.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

import moetool.io.safetensors_header as sh
from moetool.errors import CheckpointError
from moetool.io.safetensors_header import (
    DTYPE_BITS,
    MAX_HEADER_BYTES,
    SafetensorsHeader,
    TensorInfo,
    parse_header,
    read_header,
)

# --------------------------------------------------------------------------- helpers


def write_raw(path: Path, header: dict | bytes, data: bytes = b"", *, prefix: int | None = None) -> Path:
    """Write a safetensors-like file by hand: prefix, header bytes, data."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if prefix is None else prefix
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def tiny_shard(path: Path) -> Path:
    """A valid two-tensor file made by safetensors."""
    save_file(
        {
            "a": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": np.arange(4, dtype=np.int16),
        },
        str(path),
    )
    return path


def split(path: Path) -> tuple[dict, bytes]:
    """The header (as a dict) and data section of a file."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def expect(code: str, func, *args, **kwargs) -> CheckpointError:
    with pytest.raises(CheckpointError) as info:
        func(*args, **kwargs)
    assert type(info.value) is CheckpointError
    assert info.value.code == code, info.value
    assert info.value.hint
    return info.value


# --------------------------------------------------------------------------- valid files


def test_reads_file_written_by_safetensors(tmp_path: Path) -> None:
    path = tiny_shard(tmp_path / "model.safetensors")
    header = read_header(path)
    assert isinstance(header, SafetensorsHeader)
    assert header.file == "model.safetensors"
    assert header.file_size == path.stat().st_size
    assert header.data_offset == 8 + header.header_len
    a, b = header.tensors["a"], header.tensors["b"]
    assert a == TensorInfo("a", "F32", (2, 3), "model.safetensors", a.data_start, a.data_start + 24)
    assert (a.numel, a.nbytes) == (6, 24)
    assert (b.dtype, b.shape, b.numel, b.nbytes) == ("I16", (4,), 4, 8)
    assert header.metadata == {}


def test_file_name_override(tmp_path: Path) -> None:
    path = tiny_shard(tmp_path / "blobhash")
    header = read_header(path, file="model-00001-of-00002.safetensors")
    assert header.file == "model-00001-of-00002.safetensors"
    assert {t.file for t in header.tensors.values()} == {"model-00001-of-00002.safetensors"}


def test_b10_valid_edge_cases_succeed(tmp_path: Path) -> None:
    """B10: zero-size tensors, 0-rank scalars, whitespace padding and __metadata__ are all valid."""
    path = tmp_path / "edge.safetensors"
    save_file(
        {
            "empty": np.zeros((0, 3), dtype=np.float32),
            "empty2": np.zeros((4, 0), dtype=np.float16),
            "scalar": np.array(3.5, dtype=np.float32),
            "x": np.ones((3,), dtype=np.int8),
        },
        str(path),
        metadata={"format": "pt", "note": "edge"},
    )
    header_dict, _ = split(path)
    # safetensors pads the header with spaces to an 8-byte boundary; make sure this file has padding.
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = read_header(path)
    assert header.metadata == {"format": "pt", "note": "edge"}
    assert header.tensors["empty"].numel == 0 and header.tensors["empty"].nbytes == 0
    assert header.tensors["empty2"].shape == (4, 0)
    scalar = header.tensors["scalar"]
    assert (scalar.shape, scalar.numel, scalar.nbytes) == ((), 1, 4)
    assert set(header.tensors) == set(header_dict) - {"__metadata__"}


def test_b10_explicit_padding_and_empty_file(tmp_path: Path) -> None:
    header = {"x": {"dtype": "U8", "shape": [2], "data_offsets": [0, 2]}}
    raw = json.dumps(header).encode() + b" " * 13
    info = read_header(write_raw(tmp_path / "pad.safetensors", raw, b"\x01\x02"))
    assert info.header_len == len(raw)
    assert info.tensors["x"].nbytes == 2
    # A file with no tensors at all is valid too (safetensors writes it for an empty dict).
    save_file({}, str(tmp_path / "none.safetensors"))
    assert read_header(tmp_path / "none.safetensors").tensors == {}


def test_zero_size_tensors_share_an_offset(tmp_path: Path) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},
        "z1": {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]},
        "z2": {"dtype": "BF16", "shape": [0, 7], "data_offsets": [4, 4]},
        "b": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},
    }
    info = read_header(write_raw(tmp_path / "z.safetensors", header, bytes(8)))
    assert list(info.tensors) == ["a", "z1", "z2", "b"]


def test_header_order_need_not_match_offset_order(tmp_path: Path) -> None:
    """Older writers sorted header keys by name; safetensors accepts any order, so do we."""
    header = {
        "b_second": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
        "a_first": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
    }
    info = read_header(write_raw(tmp_path / "o.safetensors", header, bytes(16)))
    assert list(info.tensors) == ["b_second", "a_first"]  # header order is kept


def test_sub_byte_and_fp8_dtypes(tmp_path: Path) -> None:
    header = {
        "f4": {"dtype": "F4", "shape": [4, 2], "data_offsets": [0, 4]},
        "f6": {"dtype": "F6_E2M3", "shape": [4], "data_offsets": [4, 7]},
        "f8": {"dtype": "F8_E4M3", "shape": [3], "data_offsets": [7, 10]},
        "e8": {"dtype": "F8_E8M0", "shape": [1], "data_offsets": [10, 11]},
    }
    info = read_header(write_raw(tmp_path / "q.safetensors", header, bytes(11)))
    assert info.tensors["f4"].numel == 8 and info.tensors["f4"].nbytes == 4
    assert info.tensors["f6"].nbytes == 3


def test_dtype_table_matches_torch_round_trip(tmp_path: Path) -> None:
    """Every dtype safetensors.torch writes is known, with the right size."""
    torch = pytest.importorskip("torch")
    from safetensors import torch as st_torch
    from safetensors.torch import save_file as torch_save

    assert set(st_torch._TYPES) <= set(DTYPE_BITS)
    tensors = {name: torch.zeros(2, 4, dtype=dt) for name, dt in st_torch._TYPES.items()}
    tensors["f4"] = torch.zeros(2, 2, dtype=torch.float4_e2m1fn_x2)
    torch_save(tensors, str(tmp_path / "all.safetensors"))
    header = read_header(tmp_path / "all.safetensors")
    for name, tensor in tensors.items():
        assert header.tensors[name].nbytes == tensor.untyped_storage().nbytes(), name
    assert header.tensors["f4"].shape == (2, 4)  # logical shape: two F4 values per byte


def test_reads_only_the_header_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "big.safetensors"
    save_file({"w": np.zeros((256, 1024), dtype=np.float32)}, str(path))  # 1 MiB of data
    read_sizes: list[int] = []
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
            read_sizes.append(len(data))
            return data

    monkeypatch.setattr(sh, "open", lambda *a, **k: Spy(real_open(*a, **k)), raising=False)
    header = read_header(path)
    assert sum(read_sizes) == 8 + header.header_len
    assert header.file_size == path.stat().st_size


def test_parse_header_remote_skips_size_check() -> None:
    raw = json.dumps({"x": {"dtype": "F16", "shape": [5], "data_offsets": [0, 10]}}).encode()
    info = parse_header(raw, file="model.safetensors", data_size=None)
    assert info.file_size is None
    assert info.header_len == len(raw)
    assert info.tensors["x"].nbytes == 10


def test_b38_huge_valid_header_parses() -> None:
    """A DeepSeek-sized header (10^5 tensors) is valid and parses; its speed is measured in bench/inspect.py."""
    entries = {}
    for i in range(100_000):
        entries[f"model.layers.{i // 768}.mlp.experts.{i % 256}.w{i % 3}.weight"] = {
            "dtype": "BF16",
            "shape": [4, 2],
            "data_offsets": [16 * i, 16 * (i + 1)],
        }
    raw = json.dumps(entries).encode()
    info = parse_header(raw, file="m.safetensors", data_size=16 * 100_000)
    assert len(info.tensors) == 100_000


# --------------------------------------------------------------------------- B1-B4: sizes and lengths


def test_b1_truncated_shard(tmp_path: Path) -> None:
    path = tiny_shard(tmp_path / "model.safetensors")
    full = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-2])
    err = expect("SHARD_TRUNCATED", read_header, path)
    assert str(full) in err.message and str(full - 2) in err.message
    assert "model.safetensors" in err.message
    assert "force-download" in err.hint


def test_b2_trailing_bytes_rejected(tmp_path: Path) -> None:
    path = tiny_shard(tmp_path / "model.safetensors")
    with path.open("ab") as fh:
        fh.write(b"extra")
    err = expect("SHARD_TRAILING_DATA", read_header, path)
    assert "5 bytes" in err.message


@pytest.mark.parametrize(
    ("prefix", "code"),
    [
        (10_000, "INVALID_HEADER_LENGTH"),  # past the end of the file
        (MAX_HEADER_BYTES + 1, "HEADER_TOO_LARGE"),
        (2**64 - 1, "HEADER_TOO_LARGE"),  # u64::MAX
        (0, "INVALID_HEADER_LENGTH"),
    ],
)
def test_b3_lying_length_prefix(tmp_path: Path, prefix: int, code: str) -> None:
    path = tiny_shard(tmp_path / "model.safetensors")
    raw = bytearray(path.read_bytes())
    raw[:8] = struct.pack("<Q", prefix)
    path.write_bytes(bytes(raw))
    tracemalloc.start()
    try:
        expect(code, read_header, path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000  # nothing allocated in proportion to the claimed length


@pytest.mark.parametrize("content", [b"", b"\x01", b"\x01\x00\x00\x00\x00\x00\x00"])
def test_b4_file_too_small(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    err = expect("HEADER_TOO_SMALL", read_header, path)
    assert f"{len(content)} bytes" in err.message


def test_unreadable_path(tmp_path: Path) -> None:
    expect("SHARD_UNREADABLE", read_header, tmp_path / "absent.safetensors")
    expect("SHARD_UNREADABLE", read_header, tmp_path)  # a folder


# --------------------------------------------------------------------------- B5-B7: offsets and sizes


@pytest.mark.parametrize(
    ("offsets_a", "offsets_b", "bad", "why"),
    [
        ([0, 16], [8, 24], "b", "overlaps"),
        ([0, 16], [20, 36], "b", "gap"),
        ([0, 16], [16, 0], "b", "ends before"),
        ([4, 20], [20, 36], "a", "gap"),  # data must start at 0
        ([0, 16], [0, 16], "b", "overlaps"),  # two tensors on the same bytes
    ],
)
def test_b5_lying_offsets(tmp_path: Path, offsets_a, offsets_b, bad: str, why: str) -> None:
    header = {
        "a": {"dtype": "F32", "shape": [4], "data_offsets": offsets_a},
        "b": {"dtype": "F32", "shape": [4], "data_offsets": offsets_b},
    }
    size = max(offsets_a[1], offsets_b[1])
    err = expect("INVALID_OFFSET", read_header, write_raw(tmp_path / "m.safetensors", header, bytes(size)))
    assert repr(bad) in err.message
    assert why in err.message


def test_b5_rewritten_offsets_in_real_file(tmp_path: Path) -> None:
    path = tiny_shard(tmp_path / "model.safetensors")
    header, data = split(path)
    header["b"]["data_offsets"] = [header["b"]["data_offsets"][0] - 4, header["b"]["data_offsets"][1] - 4]
    write_raw(path, header, data[:-4])
    err = expect("INVALID_OFFSET", read_header, path)
    assert "'b'" in err.message


def test_b6_shape_disagrees_with_bytes(tmp_path: Path) -> None:
    path = tiny_shard(tmp_path / "model.safetensors")
    header, data = split(path)
    header["a"]["shape"] = [3, 3]
    err = expect("TENSOR_INVALID_INFO", read_header, write_raw(path, header, data))
    assert "'a'" in err.message and "36" in err.message and "24" in err.message


def test_b6_sub_byte_tensor_must_fill_bytes(tmp_path: Path) -> None:
    header = {"f4": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}
    expect("TENSOR_INVALID_INFO", read_header, write_raw(tmp_path / "m.safetensors", header, bytes(2)))


@pytest.mark.parametrize(
    "shape",
    [[2**62, 2**62], [2**62] * 1000, [2**40, 2**40, 0], [2**63]],
)
def test_b7_shape_overflow(tmp_path: Path, shape: list[int]) -> None:
    header = {"x": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}}
    err = expect("VALIDATION_OVERFLOW", read_header, write_raw(tmp_path / "m.safetensors", header, bytes(4)))
    assert "'x'" in err.message


# --------------------------------------------------------------------------- B8, B9, B11: header content


def test_b8_unknown_dtype(tmp_path: Path) -> None:
    header = {"x": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 1]}}
    err = expect("HEADER_INVALID_JSON", read_header, write_raw(tmp_path / "m.safetensors", header, bytes(1)))
    assert "Q9" in err.message and "'x'" in err.message


def test_b9_non_utf8_header(tmp_path: Path) -> None:
    path = write_raw(tmp_path / "m.safetensors", b'{"\xff\xfe": 1}')
    expect("HEADER_INVALID_UTF8", read_header, path)


@pytest.mark.parametrize(
    "raw",
    [
        b"{",  # missing the rest
        b"not json at all",
        b'"x": {"dtype": "F32"}',  # missing leading '{'
        b"[1, 2, 3]",  # JSON, but not an object
        b"null",
        b'{"x": NaN}',  # non-standard literal
        b"[" * 100_000,  # nested past the recursion limit
    ],
)
def test_b9_not_a_json_object(tmp_path: Path, raw: bytes) -> None:
    expect("HEADER_INVALID_JSON", read_header, write_raw(tmp_path / "m.safetensors", raw))


def test_b11_duplicate_key_in_header(tmp_path: Path) -> None:
    entry = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
    raw = f'{{"x": {entry}, "x": {entry}}}'.encode()
    err = expect("HEADER_INVALID_JSON", read_header, write_raw(tmp_path / "m.safetensors", raw, bytes(1)))
    assert "duplicate" in err.message


@pytest.mark.parametrize(
    "entry",
    [
        {"shape": [1], "data_offsets": [0, 4]},  # no dtype
        {"dtype": "F32", "data_offsets": [0, 4]},  # no shape
        {"dtype": "F32", "shape": [1]},  # no offsets
        {"dtype": 32, "shape": [1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]},  # bool is not an int
        {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1.0], "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": "1", "data_offsets": [0, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]},
        {"dtype": "F32", "shape": [1], "data_offsets": [False, 4]},
        {"dtype": "F32", "shape": [1], "data_offsets": [-4, 0]},
        {"dtype": "F32", "shape": [2**64], "data_offsets": [0, 4]},
        [1, 2, 3],
        "F32",
    ],
)
def test_malformed_tensor_entry(tmp_path: Path, entry) -> None:
    header = {"x": entry}
    err = expect("HEADER_INVALID_JSON", read_header, write_raw(tmp_path / "m.safetensors", header, bytes(4)))
    assert "'x'" in err.message


@pytest.mark.parametrize("metadata", [{"format": 1}, ["format", "pt"], "pt", {"a": None}])
def test_metadata_must_map_strings_to_strings(tmp_path: Path, metadata) -> None:
    header = {"__metadata__": metadata, "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    expect("HEADER_INVALID_JSON", read_header, write_raw(tmp_path / "m.safetensors", header, bytes(1)))


def test_metadata_null_is_empty(tmp_path: Path) -> None:
    header = {"__metadata__": None, "x": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}
    assert read_header(write_raw(tmp_path / "m.safetensors", header, bytes(1))).metadata == {}


def test_hostile_long_names_are_cut_in_messages(tmp_path: Path) -> None:
    header = {"n" * 1_000_000: {"dtype": "Q9" * 1000, "shape": [1], "data_offsets": [0, 1]}}
    err = expect("HEADER_INVALID_JSON", read_header, write_raw(tmp_path / "m.safetensors", header, bytes(1)))
    assert len(err.message) < 1000
