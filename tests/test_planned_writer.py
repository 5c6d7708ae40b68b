"""PlannedShardWriter: headers first, tensor bytes streamed in plan order, exact predicted sizes."""

from __future__ import annotations

import hashlib
import json
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moetool.io.checkpoint import Checkpoint
from moetool.io.planned_writer import (
    PlannedEntry,
    PlannedShardWriter,
    WriterOrderError,
    dtype_name,
    plan_shards,
)
from moetool.io.writer import DuplicateTensorError


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(8, 4, generator=g),
        "b.weight": torch.randn(16, generator=g).bfloat16(),
        "empty": torch.zeros(0, 4),
        "scalar": torch.tensor(3.5),
        "c.weight": torch.randn(4, 4, generator=g).half(),
        "ids": torch.arange(6, dtype=torch.int64),
    }


def entries_of(ts: dict[str, torch.Tensor]) -> list[PlannedEntry]:
    return [PlannedEntry(name, dtype_name(t.dtype), tuple(t.shape)) for name, t in ts.items()]


def write_all(folder: Path, ts: dict[str, torch.Tensor], max_shard_size: int = 10**9) -> PlannedShardWriter:
    folder.mkdir(parents=True, exist_ok=True)
    with PlannedShardWriter(folder, entries_of(ts), max_shard_size=max_shard_size) as writer:
        for name, tensor in ts.items():
            writer.write(name, tensor)
    return writer


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("max_shard_size", [10**9, 100, 1])
def test_round_trip_through_validating_reader_and_safetensors(tmp_path, max_shard_size):
    ts = tensors()
    writer = write_all(tmp_path, ts, max_shard_size)
    (tmp_path / "config.json").write_text("{}")
    checkpoint = Checkpoint.open(tmp_path)  # validates headers, offsets, index
    assert not checkpoint.warnings
    for name, tensor in ts.items():
        assert torch.equal(checkpoint.read_tensor(name), tensor), name
    shards = sorted(tmp_path.glob("*.safetensors"))
    assert sum(p.stat().st_size for p in shards) == writer.file_bytes
    with safe_open(str(shards[0]), "pt") as handle:
        assert handle.metadata() == {"format": "pt"}
    if max_shard_size == 10**9:
        assert [p.name for p in shards] == ["model.safetensors"]
    else:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == writer.total_size
        assert set(index["weight_map"]) == set(ts)
        assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"


def test_same_plan_gives_identical_bytes(tmp_path):
    write_all(tmp_path / "one", tensors(), 200)
    write_all(tmp_path / "two", tensors(), 200)
    assert digest(tmp_path / "one") == digest(tmp_path / "two")


def test_plan_shards_predicts_sizes_without_io():
    ts = tensors()
    shards = plan_shards(entries_of(ts), 100)
    assert len(shards) > 1
    assert all(s.data_bytes <= 100 or len(s.entries) == 1 for s in shards)
    assert [e.name for s in shards for e in s.entries] == list(ts)
    assert all(len(s.header) % 8 == 0 for s in shards)


def test_wrong_order_dtype_shape_and_missing_tensors_refused(tmp_path):
    ts = tensors()
    folder = tmp_path / "out"
    folder.mkdir()
    with pytest.raises(WriterOrderError, match=r"expects 'a\.weight'"), PlannedShardWriter(folder, entries_of(ts)) as w:
        w.write("b.weight", ts["b.weight"])
    assert list(folder.iterdir()) == []  # aborted: partial shard removed
    with pytest.raises(WriterOrderError, match="the plan says F32"), PlannedShardWriter(folder, entries_of(ts)) as w:
        w.write("a.weight", ts["a.weight"].double())
    with pytest.raises(WriterOrderError, match=r"\[8, 4\]"), PlannedShardWriter(folder, entries_of(ts)) as w:
        w.write("a.weight", ts["a.weight"].T)
    writer = PlannedShardWriter(folder, entries_of(ts))
    writer.write("a.weight", ts["a.weight"])
    with pytest.raises(WriterOrderError, match="before every planned tensor"):
        writer.finalize()
    writer.abort()
    assert list(folder.iterdir()) == []


def test_duplicate_names_and_empty_plans_refused(tmp_path):
    entry = PlannedEntry("x", "F32", (2,))
    with pytest.raises(DuplicateTensorError):
        plan_shards([entry, entry])
    with pytest.raises(Exception, match="no tensors"):
        plan_shards([])


def test_write_parts_streams_a_stacked_tensor(tmp_path):
    full = torch.randn(4, 3, 2)
    with PlannedShardWriter(tmp_path, [PlannedEntry("fused", "F32", (4, 3, 2))]) as writer:
        writer.write_parts("fused", (full[i : i + 1] for i in range(4)))
    (tmp_path / "config.json").write_text("{}")
    assert torch.equal(Checkpoint.open(tmp_path).read_tensor("fused"), full)
    folder = tmp_path / "short"
    folder.mkdir()
    planned = [PlannedEntry("fused", "F32", (4, 3, 2))]
    with pytest.raises(WriterOrderError, match="cover 3 of its 4 rows"), PlannedShardWriter(folder, planned) as w:
        w.write_parts("fused", (full[i : i + 1] for i in range(3)))


def test_memory_stays_near_one_tensor(tmp_path):
    # 40 tensors of 1 MB across shards of 3 MB, the same tensor object written each time (like expert
    # copies): Python-side allocations stay far below the data written, and no shard is buffered.
    tensor = torch.randn(512, 512)  # 1 MiB
    entries = [PlannedEntry(f"t{i}", "F32", (512, 512)) for i in range(40)]
    tracemalloc.start()
    with PlannedShardWriter(tmp_path, entries, max_shard_size=3 * 2**20) as writer:
        for entry in entries:
            writer.write(entry.name, tensor)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert writer.total_size == 40 * 2**20
    assert len(list(tmp_path.glob("*.safetensors"))) == 14
    assert peak < 2**20 // 4, peak  # zero-copy: not even one tensor's bytes were copied by Python
