"""ShardWriter, the one safetensors writer: with a plan (headers first, bytes streamed in plan order, exact
predicted sizes) and without one (any order, spilled to disk), the same files either way."""

from __future__ import annotations

import errno
import hashlib
import json
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from moetool.errors import MoetoolError, OutputError, UsageError
from moetool.io.checkpoint import Checkpoint
from moetool.io.dtypes import dtype_name
from moetool.io.names import INDEX_NAME
from moetool.io.shards import (
    DuplicateTensorError,
    PlannedEntry,
    ShardWriter,
    WriteResult,
    WriterOrderError,
    plan_shards,
)
from moetool.io.sizes import parse_size
from moetool.io.writer import DiskFullError, check_disk_space, staged_output
from tests.helpers import make_tensors, read_weights, write_weights


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_unplanned(folder: Path, tensors: dict[str, torch.Tensor], **kwargs) -> WriteResult:
    return write_weights(folder, tensors, **kwargs).result


# --------------------------------------------------------------------------------------------------
# With a plan


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


def write_planned(folder: Path, ts: dict[str, torch.Tensor], max_shard_size: int = 10**9) -> ShardWriter:
    return write_weights(folder, ts, planned=True, max_shard_size=max_shard_size)


def digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@pytest.mark.parametrize("max_shard_size", [10**9, 100, 1])
def test_round_trip_through_validating_reader_and_safetensors(tmp_path, max_shard_size):
    ts = tensors()
    writer = write_planned(tmp_path, ts, max_shard_size)
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
    write_planned(tmp_path / "one", tensors(), 200)
    write_planned(tmp_path / "two", tensors(), 200)
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
    with pytest.raises(WriterOrderError, match=r"expects 'a\.weight'"), ShardWriter(folder, entries_of(ts)) as w:
        w.add("b.weight", ts["b.weight"])
    assert list(folder.iterdir()) == []  # aborted: partial shard removed
    with pytest.raises(WriterOrderError, match="the plan says F32"), ShardWriter(folder, entries_of(ts)) as w:
        w.add("a.weight", ts["a.weight"].double())
    with pytest.raises(WriterOrderError, match=r"\[8, 4\]"), ShardWriter(folder, entries_of(ts)) as w:
        w.add("a.weight", ts["a.weight"].T)
    writer = ShardWriter(folder, entries_of(ts))
    writer.add("a.weight", ts["a.weight"])
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
    with ShardWriter(tmp_path, [PlannedEntry("fused", "F32", (4, 3, 2))]) as writer:
        writer.add_parts("fused", (full[i : i + 1] for i in range(4)))
    (tmp_path / "config.json").write_text("{}")
    assert torch.equal(Checkpoint.open(tmp_path).read_tensor("fused"), full)
    folder = tmp_path / "short"
    folder.mkdir()
    planned = [PlannedEntry("fused", "F32", (4, 3, 2))]
    with pytest.raises(WriterOrderError, match="cover 3 of its 4 rows"), ShardWriter(folder, planned) as w:
        w.add_parts("fused", (full[i : i + 1] for i in range(3)))


def test_memory_stays_near_one_tensor(tmp_path):
    # 40 tensors of 1 MB across shards of 3 MB, the same tensor object written each time (like expert
    # copies): Python-side allocations stay far below the data written, and no shard is buffered.
    tensor = torch.randn(512, 512)  # 1 MiB
    entries = [PlannedEntry(f"t{i}", "F32", (512, 512)) for i in range(40)]
    tracemalloc.start()
    with ShardWriter(tmp_path, entries, max_shard_size=3 * 2**20) as writer:
        for entry in entries:
            writer.add(entry.name, tensor)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert writer.total_size == 40 * 2**20
    assert len(list(tmp_path.glob("*.safetensors"))) == 14
    assert peak < 2**20 // 4, peak  # zero-copy: not even one tensor's bytes were copied by Python


# --------------------------------------------------------------------------------------------------
# Without a plan (any order, spilled to disk)


def test_round_trip_several_shards(tmp_path: Path) -> None:
    tensors = make_tensors()
    result = write_unplanned(tmp_path, tensors, max_shard_size=128)

    shards = [f for f in result.files if f != INDEX_NAME]
    assert len(shards) >= 3
    n = len(shards)
    assert shards == [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    assert result.files[-1] == INDEX_NAME
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(result.files)

    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert index["metadata"]["total_size"] == sum(nbytes(t) for t in tensors.values())
    assert result.total_size == index["metadata"]["total_size"]
    assert result.num_tensors == len(tensors)
    assert list(index["weight_map"]) == sorted(tensors)

    loaded = read_weights(tmp_path)
    assert set(loaded) == set(tensors)
    for name, t in tensors.items():
        assert loaded[name].dtype == t.dtype, name
        assert torch.equal(loaded[name], t), name
    for shard in shards:
        with safe_open(tmp_path / shard, "pt") as f:
            assert f.metadata()["format"] == "pt"


def test_transformers_from_pretrained_loads_sharded_output(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    out = tmp_path / "out"
    with staged_output(out) as stage:
        with ShardWriter(stage, max_shard_size=4000) as w:
            for name, t in model.state_dict().items():
                w.add(name, t)
        config.save_pretrained(stage)
    assert w.result is not None and len(w.result.files) > 3
    loaded = transformers.AutoModelForCausalLM.from_pretrained(out)
    reference = model.state_dict()
    for name, t in loaded.state_dict().items():
        assert torch.equal(t, reference[name]), name


def test_shards_respect_bound_and_order(tmp_path: Path) -> None:
    tensors = make_tensors()
    write_unplanned(tmp_path, tensors, max_shard_size=128)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    # Shards follow the order tensors were added in, and stay within the bound unless one tensor alone
    # is bigger.
    order = [index["weight_map"][name] for name in tensors]
    assert order == sorted(order)
    per_shard: dict[str, list[int]] = {}
    for name, shard in index["weight_map"].items():
        per_shard.setdefault(shard, []).append(nbytes(tensors[name]))
    for sizes in per_shard.values():
        assert sum(sizes) <= 128 or len(sizes) == 1


def test_oversized_tensor_gets_its_own_shard(tmp_path: Path) -> None:
    tensors = {"a": torch.zeros(2), "big": torch.zeros(100), "b": torch.zeros(2)}
    result = write_unplanned(tmp_path, tensors, max_shard_size=64)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert len(result.files) == 4  # three shards + index
    assert len({index["weight_map"][k] for k in tensors}) == 3


def test_single_shard_is_model_safetensors_without_index(tmp_path: Path) -> None:
    tensors = make_tensors()
    result = write_unplanned(tmp_path, tensors)
    assert result.files == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = read_weights(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t) and loaded[name].dtype == t.dtype


def test_deterministic_bytes(tmp_path: Path) -> None:
    metadata = {"moetool": "0.1.0", "a": "1", "b": "2", "c": "3", "d": "4"}
    for run in ("one", "two"):
        write_unplanned(tmp_path / run, make_tensors(), max_shard_size=128, metadata=metadata)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    with safe_open(tmp_path / "one" / files[0], "pt") as f:
        assert f.metadata() == {**metadata, "format": "pt"}


def test_shard_size_does_not_change_tensor_bytes(tmp_path: Path) -> None:
    write_unplanned(tmp_path / "small", make_tensors(), max_shard_size=100)
    write_unplanned(tmp_path / "large", make_tensors(), max_shard_size=10**9)
    small = read_weights(tmp_path / "small")
    large = read_weights(tmp_path / "large")
    assert set(small) == set(large)

    def digest(t: torch.Tensor) -> str:
        return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()

    for name in small:
        assert small[name].dtype == large[name].dtype
        assert digest(small[name]) == digest(large[name]), name


def test_views_and_non_contiguous_tensors(tmp_path: Path) -> None:
    fused = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    tensors = {
        "expert0": fused[0],  # slices of one storage: would be refused by safetensors as shared
        "expert1": fused[1],
        "transposed": fused[0].t(),
        "tied_a": fused,
        "tied_b": fused,
    }
    write_unplanned(tmp_path, tensors)
    loaded = read_weights(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t), name


def test_duplicate_name_refused(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path)
    w.add("x", torch.zeros(1))
    with pytest.raises(DuplicateTensorError) as info:
        w.add("x", torch.ones(1))
    assert isinstance(info.value, ValueError) and isinstance(info.value, MoetoolError)
    assert info.value.code == "DUPLICATE_TENSOR"


def test_add_after_finalize_and_empty_finalize(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path / "a")
    with pytest.raises(MoetoolError, match="no tensors"):
        w.finalize()
    w = ShardWriter(tmp_path / "b")
    w.add("x", torch.zeros(1))
    w.finalize()
    with pytest.raises(MoetoolError, match="finalized"):
        w.add("y", torch.zeros(1))


def test_context_manager_error_removes_partial_shards(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardWriter(tmp_path, max_shard_size=8) as w:
        for i in range(4):
            w.add(f"t{i}", torch.zeros(4))
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    def full(source, target, length=0):
        target.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", full)
    w = ShardWriter(tmp_path)
    w.add("x", torch.zeros(4))
    with pytest.raises(DiskFullError) as info:
        w.finalize()
    assert info.value.code == "DISK_FULL"
    assert "bytes" in info.value.message and "free" in info.value.message
    assert list(tmp_path.iterdir()) == []


def test_check_disk_space(tmp_path: Path) -> None:
    check_disk_space(tmp_path / "not-yet", 1)
    with pytest.raises(DiskFullError, match="needs"):
        check_disk_space(tmp_path, 10**20)


# --------------------------------------------------------------------------------------------------
# parse_size


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("5GB", 5 * 10**9),
        ("5gb", 5 * 10**9),
        ("5GiB", 5 * 2**30),
        ("5gib", 5 * 2**30),
        ("500M", 500 * 10**6),
        ("500MB", 500 * 10**6),
        ("2KiB", 2048),
        ("1TB", 10**12),
        ("1.5GB", 1_500_000_000),
        ("123", 123),
        ("10B", 10),
        (" 7 MB ", 7 * 10**6),
        (4096, 4096),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize("bad", ["", "GB", "-5GB", "0", "0GB", "5XB", "5 G B", "five", "5iB", "1e9", 0, -1, True])
def test_parse_size_refuses(bad: object) -> None:
    with pytest.raises(UsageError) as info:
        parse_size(bad)  # type: ignore[arg-type]
    assert info.value.exit_code == 2
    assert info.value.hint


# --------------------------------------------------------------------------------------------------
# One format either way


@pytest.mark.parametrize("max_shard_size", [10**9, 128, 1])
def test_planned_and_unplanned_write_identical_files(tmp_path: Path, max_shard_size: int) -> None:
    """The two ways in give byte-identical shards and index for the same tensors in the same order."""
    write_weights(tmp_path / "planned", make_tensors(), planned=True, max_shard_size=max_shard_size)
    write_weights(tmp_path / "unplanned", make_tensors(), max_shard_size=max_shard_size)
    names = sorted(p.name for p in (tmp_path / "planned").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "unplanned").iterdir())
    for name in names:
        assert (tmp_path / "planned" / name).read_bytes() == (tmp_path / "unplanned" / name).read_bytes(), name


def test_stem_names_single_files_and_other_writers_files_are_not_mistaken(tmp_path: Path) -> None:
    """A stem gives other file names (distill's checkpoint files); a file of another stem is not "old weights"."""
    write_weights(tmp_path, {"x": torch.zeros(2)}, stem="rng-rank10")
    write_weights(tmp_path, {"x": torch.ones(2)}, stem="rng-rank1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rng-rank1.safetensors", "rng-rank10.safetensors"]
    with pytest.raises(OutputError, match="already holds"):
        ShardWriter(tmp_path, stem="rng-rank1")


def test_add_parts_needs_a_plan(tmp_path: Path) -> None:
    with pytest.raises(WriterOrderError, match="planned"), ShardWriter(tmp_path) as writer:
        writer.add_parts("x", [torch.zeros(1, 2)])


def test_unique_state_tensors_keeps_tied_weights_once() -> None:
    from moetool.io.shards import unique_state_tensors

    module = torch.nn.Module()
    module.embed = torch.nn.Embedding(4, 2)
    module.head = torch.nn.Linear(2, 4, bias=False)
    module.head.weight = module.embed.weight  # tied, as tie_word_embeddings does
    module.other = torch.nn.Linear(2, 2)
    assert [name for name, _ in unique_state_tensors(module)] == ["embed.weight", "other.weight", "other.bias"]
