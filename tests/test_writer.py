"""Tests for moetool.io.writer (staged output, sharded safetensors) and moetool.io.model_card."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from moetool.errors import MoetoolError, OutputError, UnsafePathError, UsageError
from moetool.io import writer as writer_mod
from moetool.io.model_card import render_model_card, write_model_card
from moetool.io.writer import (
    INDEX_NAME,
    DiskFullError,
    DuplicateTensorError,
    ShardedWriter,
    WriteResult,
    check_disk_space,
    check_output_path,
    copy_aux_files,
    parse_size,
    staged_output,
    stale_staging_dirs,
    write_json,
)

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# helpers


def make_tensors() -> dict[str, torch.Tensor]:
    """Ten small tensors of mixed dtypes with deterministic, non-trivial values."""
    gen = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(8, 4, generator=gen),
        "model.layers.0.mlp.gate.weight": torch.randn(4, 4, generator=gen).to(torch.bfloat16),
        "model.layers.0.mlp.experts.0.w1.weight": torch.randn(6, 4, generator=gen).half(),
        "model.layers.0.mlp.experts.1.w1.weight": torch.randn(6, 4, generator=gen).half(),
        "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=gen),
        "model.layers.0.input_layernorm.weight": torch.ones(4),
        "model.norm.weight": torch.linspace(-1, 1, 4, dtype=torch.float64),
        "lm_head.weight": torch.randn(8, 4, generator=gen),
        "buffers.position_ids": torch.arange(12, dtype=torch.int64),
        "buffers.mask": torch.tensor([True, False, True]),
    }


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def write_all(folder: Path, tensors: dict[str, torch.Tensor], **kwargs) -> WriteResult:
    with ShardedWriter(folder, **kwargs) as w:
        for name, t in tensors.items():
            w.add(name, t)
    assert w.result is not None
    return w.result


def load_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Read a folder the way transformers does: the index if present, else model.safetensors."""
    index_path = folder / INDEX_NAME
    if not index_path.exists():
        return load_file(folder / "model.safetensors")
    index = json.loads(index_path.read_text())
    loaded: dict[str, torch.Tensor] = {}
    for shard in sorted(set(index["weight_map"].values())):
        part = load_file(folder / shard)
        for name in part:
            assert index["weight_map"][name] == shard
        loaded.update(part)
    assert set(loaded) == set(index["weight_map"])
    return loaded


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".moetool-"))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


# --------------------------------------------------------------------------------------------------
# ShardedWriter


def test_round_trip_several_shards(tmp_path: Path) -> None:
    tensors = make_tensors()
    result = write_all(tmp_path, tensors, max_shard_size=128)

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

    loaded = load_checkpoint(tmp_path)
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
        with ShardedWriter(stage, max_shard_size=4000) as w:
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
    write_all(tmp_path, tensors, max_shard_size=128)
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
    result = write_all(tmp_path, tensors, max_shard_size=64)
    index = json.loads((tmp_path / INDEX_NAME).read_text())
    assert len(result.files) == 4  # three shards + index
    assert len({index["weight_map"][k] for k in tensors}) == 3


def test_single_shard_is_model_safetensors_without_index(tmp_path: Path) -> None:
    tensors = make_tensors()
    result = write_all(tmp_path, tensors)
    assert result.files == ["model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    loaded = load_checkpoint(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t) and loaded[name].dtype == t.dtype


def test_deterministic_bytes(tmp_path: Path) -> None:
    metadata = {"moetool": "0.1.0", "a": "1", "b": "2", "c": "3", "d": "4"}
    for run in ("one", "two"):
        write_all(tmp_path / run, make_tensors(), max_shard_size=128, metadata=metadata)
    files = sorted(p.name for p in (tmp_path / "one").iterdir())
    assert files == sorted(p.name for p in (tmp_path / "two").iterdir())
    for name in files:
        assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes(), name
    with safe_open(tmp_path / "one" / files[0], "pt") as f:
        assert f.metadata() == {**metadata, "format": "pt"}


def test_shard_size_does_not_change_tensor_bytes(tmp_path: Path) -> None:
    write_all(tmp_path / "small", make_tensors(), max_shard_size=100)
    write_all(tmp_path / "large", make_tensors(), max_shard_size=10**9)
    small = load_checkpoint(tmp_path / "small")
    large = load_checkpoint(tmp_path / "large")
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
    write_all(tmp_path, tensors)
    loaded = load_checkpoint(tmp_path)
    for name, t in tensors.items():
        assert torch.equal(loaded[name], t), name


def test_duplicate_name_refused(tmp_path: Path) -> None:
    w = ShardedWriter(tmp_path)
    w.add("x", torch.zeros(1))
    with pytest.raises(DuplicateTensorError) as info:
        w.add("x", torch.ones(1))
    assert isinstance(info.value, ValueError) and isinstance(info.value, MoetoolError)
    assert info.value.code == "DUPLICATE_TENSOR"


def test_add_after_finalize_and_empty_finalize(tmp_path: Path) -> None:
    w = ShardedWriter(tmp_path / "a")
    with pytest.raises(MoetoolError, match="no tensors"):
        w.finalize()
    w = ShardedWriter(tmp_path / "b")
    w.add("x", torch.zeros(1))
    w.finalize()
    with pytest.raises(MoetoolError, match="finalized"):
        w.add("y", torch.zeros(1))


def test_context_manager_error_removes_partial_shards(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), ShardedWriter(tmp_path, max_shard_size=8) as w:
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
    w = ShardedWriter(tmp_path)
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
# check_output_path


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text("{}")
    return src


def _code(exc_info: pytest.ExceptionInfo[OutputError]) -> str:
    assert exc_info.value.exit_code == 2
    return exc_info.value.code


def test_out_equal_to_input_refused(model_dir: Path) -> None:
    with pytest.raises(OutputError) as info:
        check_output_path(model_dir, [model_dir], overwrite=True)
    assert _code(info) == "OUTPUT_OVERLAPS_INPUT"


def test_out_inside_input_refused(model_dir: Path) -> None:
    with pytest.raises(OutputError) as info:
        check_output_path(model_dir / "sub" / "out", [model_dir])
    assert _code(info) == "OUTPUT_OVERLAPS_INPUT"


def test_input_inside_out_refused(tmp_path: Path, model_dir: Path) -> None:
    with pytest.raises(OutputError) as info:
        check_output_path(tmp_path, [model_dir], overwrite=True)
    assert _code(info) == "OUTPUT_OVERLAPS_INPUT"


def test_overlap_through_symlinked_spelling(tmp_path: Path, model_dir: Path) -> None:
    alias = tmp_path / "alias"
    alias.symlink_to(model_dir)
    with pytest.raises(OutputError) as info:
        check_output_path(alias / "out", [model_dir])
    assert _code(info) == "OUTPUT_OVERLAPS_INPUT"


def test_out_containing_an_input_symlink_target_refused(tmp_path: Path) -> None:
    blobs = tmp_path / "store" / "blobs"
    blobs.mkdir(parents=True)
    (blobs / "abc").write_text("{}")
    snap = tmp_path / "snap"
    snap.mkdir()
    (snap / "tokenizer.json").symlink_to(blobs / "abc")
    with pytest.raises(OutputError) as info:
        check_output_path(tmp_path / "store", [snap], overwrite=True)
    assert _code(info) == "OUTPUT_OVERLAPS_INPUT"


def test_out_inside_hf_cache_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(OutputError) as info:
        check_output_path(cache / "models--x" / "out", [])
    assert _code(info) == "OUTPUT_OVERLAPS_INPUT"


def test_symlink_out_refused(tmp_path: Path, model_dir: Path) -> None:
    victim = tmp_path / "victim"
    victim.mkdir()
    link = tmp_path / "out"
    link.symlink_to(victim)
    with pytest.raises(OutputError) as info:
        check_output_path(link, [model_dir], overwrite=True)
    assert _code(info) == "OUTPUT_IS_SYMLINK"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputError) as info:
        check_output_path(dangling, [model_dir])
    assert _code(info) == "OUTPUT_IS_SYMLINK"


def test_existing_out(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    check_output_path(out, [model_dir])  # empty folder is fine
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputError) as info:
        check_output_path(out, [model_dir])
    assert _code(info) == "OUTPUT_EXISTS"
    assert "--overwrite" in (info.value.hint or "")
    check_output_path(out, [model_dir], overwrite=True)
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OutputError) as info:
        check_output_path(a_file, [model_dir], overwrite=True)
    assert _code(info) == "OUTPUT_EXISTS"


# --------------------------------------------------------------------------------------------------
# staged_output


def test_staged_output_publishes(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "deep" / "out"
    before = signal.getsignal(signal.SIGTERM)
    with staged_output(out, inputs=[model_dir]) as stage:
        assert stage.parent == out.parent
        assert stage.name.startswith(f".moetool-tmp-out-{os.getpid()}-")
        assert (out.parent / ".moetool-lock-out").exists()
        assert not out.exists()
        write_all(stage, make_tensors(), max_shard_size=128)
        write_json(stage / "config.json", {"model_type": "x"})
    assert signal.getsignal(signal.SIGTERM) is before
    assert (out / INDEX_NAME).exists() and (out / "config.json").exists()
    assert leftovers(out.parent) == []
    assert (model_dir / "config.json").read_text() == "{}"


def test_overwrite_replaces_old_content(tmp_path: Path, model_dir: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(OutputError), staged_output(out, inputs=[model_dir]):
        pass
    assert (out / "old.txt").exists()
    with staged_output(out, inputs=[model_dir], overwrite=True) as stage:
        (stage / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["moetool-manifest.json", "new.txt"]
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("exc", [RuntimeError("boom"), KeyboardInterrupt(), SystemExit(1)])
def test_exception_leaves_nothing(tmp_path: Path, model_dir: Path, exc: BaseException) -> None:
    out = tmp_path / "out"
    with pytest.raises(type(exc)), staged_output(out, inputs=[model_dir]) as stage:
        write_all(stage, make_tensors(), max_shard_size=128)
        raise exc
    assert not out.exists()
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json"]


def test_exception_keeps_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError), staged_output(out, overwrite=True) as stage:
        (stage / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert leftovers(tmp_path) == []


def test_live_lock_refused(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / ".moetool-lock-out"
        lock.write_text(f"{sleeper.pid}\n")
        with pytest.raises(OutputError) as info, staged_output(tmp_path / "out"):
            pass
        assert info.value.code == "OUTPUT_LOCKED"
        assert str(sleeper.pid) in info.value.message
        assert lock.read_text() == f"{sleeper.pid}\n"  # someone else's lock is left alone
        assert not (tmp_path / "out").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


def test_nested_run_to_same_out_is_locked(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with staged_output(out) as stage:
        (stage / "a").write_text("a")
        with pytest.raises(OutputError) as info, staged_output(out):
            pass
        assert info.value.code == "OUTPUT_LOCKED"
    assert (out / "a").exists()
    assert leftovers(tmp_path) == []


def test_stale_lock_taken_over(tmp_path: Path) -> None:
    lock = tmp_path / ".moetool-lock-out"
    lock.write_text(f"{dead_pid()}\n")
    with staged_output(tmp_path / "out") as stage:
        assert lock.read_text().splitlines()[0] == str(os.getpid())
        (stage / "a").write_text("a")
    assert (tmp_path / "out" / "a").exists()
    assert not lock.exists()


def test_stale_staging_dirs(tmp_path: Path) -> None:
    dead = tmp_path / f".moetool-tmp-my-out-{dead_pid()}-abcd1234"
    live = tmp_path / f".moetool-tmp-my-out-{os.getpid()}-abcd1234"
    old = tmp_path / f".moetool-old-my-out-{dead_pid()}-beef0000"
    for d in (dead, live, old):
        d.mkdir()
    (tmp_path / "unrelated").mkdir()
    assert stale_staging_dirs(tmp_path) == sorted([dead, old])
    assert stale_staging_dirs(tmp_path / "missing") == []


_INTERRUPTED_SCRIPT = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    import torch
    from moetool.io.writer import ShardedWriter, staged_output

    with staged_output(Path(sys.argv[1]), inputs=[Path(sys.argv[2])]) as stage:
        writer = ShardedWriter(stage, max_shard_size=64)
        for i in range(6):
            writer.add(f"t{i}", torch.full((10,), float(i)))
        (stage / "config.json").write_text("{}")
        print("ready", flush=True)
        time.sleep(60)
    """
)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_write_leaves_nothing(tmp_path: Path, model_dir: Path, signum: int) -> None:
    script = tmp_path / "script.py"
    script.write_text(_INTERRUPTED_SCRIPT)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(out), str(model_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=subprocess_env(),
        cwd=REPO,
    )
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        assert ready, "the child never got ready"
        line = proc.stdout.readline()  # type: ignore[union-attr]
        assert line.strip() == b"ready", proc.stderr.read()  # type: ignore[union-attr]
        assert any(p.name.startswith(".moetool-tmp-out-") for p in tmp_path.iterdir())
        proc.send_signal(signum)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode != 0
    assert not out.exists()
    assert leftovers(tmp_path) == []
    assert sorted(p.name for p in model_dir.iterdir()) == ["config.json"]


# --------------------------------------------------------------------------------------------------
# auxiliary files and JSON


def test_copy_aux_files(tmp_path: Path) -> None:
    # An HF-cache-like snapshot: files are relative symlinks into ../../blobs.
    repo = tmp_path / "models--org--name"
    blobs = repo / "blobs"
    snap = repo / "snapshots" / "abc123"
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    (blobs / "tok").write_text('{"tok": 1}')
    (snap / "tokenizer.json").symlink_to(Path("..", "..", "blobs", "tok"))
    for name in (
        "tokenizer_config.json",
        "special_tokens_map.json",
        "cl100k.tiktoken",
        "chat_template.jinja",
        "generation_config.json",
        "config.json",
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "README.md",
    ):
        (snap / name).write_text(name)
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "generation_config.json").write_text("mine")

    copied = copy_aux_files(snap, dst)
    assert copied == [
        "chat_template.jinja",
        "cl100k.tiktoken",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert sorted(p.name for p in dst.iterdir()) == sorted([*copied, "generation_config.json"])
    assert not (dst / "tokenizer.json").is_symlink()
    assert (dst / "tokenizer.json").read_text() == '{"tok": 1}'
    assert (dst / "generation_config.json").read_text() == "mine"


def test_copy_aux_files_refuses_escaping_symlink(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("secret")
    src = tmp_path / "src"
    src.mkdir()
    (src / "vocab.txt").symlink_to(secret)
    dst = tmp_path / "dst"
    dst.mkdir()
    with pytest.raises(UnsafePathError):
        copy_aux_files(src, dst)
    assert list(dst.iterdir()) == []


def test_write_json(tmp_path: Path) -> None:
    path = tmp_path / "x.json"
    write_json(path, {"b": 1, "a": "é", "nested": [1, 2]})
    text = path.read_text(encoding="utf-8")
    assert text.endswith("}\n")
    assert text.index('"b"') < text.index('"a"')  # insertion order kept
    assert '"é"' in text and '\n  "b": 1' in text
    with pytest.raises(ValueError):
        write_json(tmp_path / "nan.json", {"x": float("nan")})
    target = tmp_path / "target"
    target.write_text("keep")
    (tmp_path / "link.json").symlink_to(target)
    with pytest.raises(OutputError) as info:
        write_json(tmp_path / "link.json", {})
    assert info.value.code == "OUTPUT_IS_SYMLINK"
    assert target.read_text() == "keep"


# --------------------------------------------------------------------------------------------------
# model card


def front_matter(text: str) -> dict:
    yaml = pytest.importorskip("yaml")
    assert text.startswith("---\n")
    end = text.index("\n---\n", 4)
    return yaml.safe_load(text[4:end])


def test_model_card_merge(tmp_path: Path) -> None:
    command = "moetool merge org/a org/b -o out --token hf_abcdefghijklmnopqrstuvwx --seed 0"
    text = render_model_card(
        base_models=["org/a", "org/b", "/local/path/model"],
        relation="merge",
        command=command,
        options={"method": "ties", "seed": 0, "weird|value": "line1\nline2", "token": "hf_secret"},
        revision="0123456789abcdef0123456789abcdef01234567",
        tags=["merge", "moe"],
        results={"perplexity": 5.4321, "passed": True},
    )
    meta = front_matter(text)
    assert meta["base_model"] == ["org/a", "org/b"]
    assert meta["base_model_relation"] == "merge"
    assert meta["library_name"] == "transformers"
    assert meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["moe", "moetool", "merge"]
    assert "moetool merge org/a org/b -o out --token *** --seed 0" in text
    assert "hf_abcdefghij" not in text and "hf_secret" not in text
    assert "```sh\n" in text
    assert "0123456789abcdef0123456789abcdef01234567" in text
    assert "| perplexity | 5.4321 |" in text
    assert "weird\\|value" in text
    from moetool import __version__

    assert __version__ in text

    from huggingface_hub import ModelCard

    card = ModelCard(text)
    assert card.data.base_model == ["org/a", "org/b"]


def test_model_card_single_and_unknown_relation(tmp_path: Path) -> None:
    path = write_model_card(
        tmp_path,
        base_models=["Qwen/Qwen1.5-0.5B"],
        relation="upcycle",
        command=["moetool", "upcycle", "Qwen/Qwen1.5-0.5B", "--num-experts", "8", "-o", "my out"],
        options={"num_experts": 8},
        tags=['tricky "quote"\u2028x\x85y: z', "#hash"],
    )
    assert path == tmp_path / "README.md"
    text = path.read_text(encoding="utf-8")
    meta = front_matter(text)
    assert meta["base_model"] == "Qwen/Qwen1.5-0.5B"
    assert meta["base_model_relation"] == "finetune"  # upcycling: the Hub's name for derived weights
    # Characters YAML reads as line breaks cannot survive in metadata: they become spaces.
    assert meta["tags"] == ["moe", "moetool", 'tricky "quote" x y: z', "#hash"]
    assert "moetool upcycle Qwen/Qwen1.5-0.5B --num-experts 8 -o 'my out'" in text


def test_model_card_command_with_backticks_stays_fenced() -> None:
    text = render_model_card(base_models=[], relation="x", command="echo ````", options={})
    assert "`````sh\necho ````\n`````" in text
    assert "base_model" not in front_matter(text)


# --------------------------------------------------------------------------------------------------
# import hygiene


def test_modules_import_without_torch() -> None:
    code = (
        "import sys, moetool.io.writer, moetool.io.model_card; "
        "bad = [m for m in ('torch', 'safetensors.torch', 'transformers') if m in sys.modules]; "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=subprocess_env(), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_staged_output_leaves_no_temp_on_publish_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"

    def broken(staging: Path, target: Path) -> None:
        raise OSError(errno.EXDEV, "cross-device link")

    monkeypatch.setattr(writer_mod, "_publish", broken)
    with pytest.raises(OSError), staged_output(out) as stage:
        (stage / "a").write_text("a")
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_writer_refuses_folder_with_old_weights(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(OutputError) as info:
        ShardedWriter(tmp_path)
    assert info.value.code == "OUTPUT_EXISTS"


def test_signal_handlers_restored_after_failure(tmp_path: Path) -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    with pytest.raises(RuntimeError), staged_output(tmp_path / "out"):
        raise RuntimeError("boom")
    assert {s: signal.getsignal(s) for s in before} == before


def test_model_card_redacts_tokens_but_not_token_counts():
    from moetool.io.model_card import _redact_command

    command = "moetool merge m -o o --max-tokens 5000 --calibration-tokens 10 --token hf_abcdefghijklmnopqrstu"
    line = _redact_command(command)
    assert "--max-tokens 5000" in line
    assert "--calibration-tokens 10" in line
    assert "hf_abcdefghijklmnopqrstu" not in line
