"""What several test files share: a tiny tokenizer and corpus, tensors to write, a weights reader, CLI runners.

Test files import from here (and from ``tests/tiny.py``, ``tests/malformed.py``), never from each other.
Fixtures live in ``tests/conftest.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moetool.data import Document

if TYPE_CHECKING:
    import torch

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "tiny-moe"

# ----------------------------------------------------------------------------- text

# Words of the test tokenizer (WordLevel: one token per word). Special tokens first: <pad> 0, <unk> 1, </s> 2.
WORDS = [
    *("the", "cat", "sat", "on", "a", "mat", "dog", "ran", "in", "park", "def", "return", "if", "else", "for"),
    *("while", "sum", "of", "two", "is", "four", "king", "war", "year", "history", "code", "math", "web"),
    *("one", "three", "five", "six", "seven", "eight", "nine", "ten"),
]
SPECIALS = ["<pad>", "<unk>", "</s>"]


def make_tokenizer(words: list[str] | tuple[str, ...] = WORDS, *, eos: bool = True, path: Path | None = None) -> Any:
    """A tiny word-level tokenizer (one token per word), optionally saved into a model folder.

    Args:
        words: the vocabulary, in id order after the special tokens.
        eos: whether the tokenizer has an end-of-sequence token.
        path: a folder to save the tokenizer files into (e.g. a tiny model from tests/tiny.py).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *dict.fromkeys(words)])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    kwargs = {"eos_token": "</s>"} if eos else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", **kwargs)
    if path is not None:
        tokenizer.save_pretrained(path)
    return tokenizer


def corpus(n: int = 60, domains: tuple[str, ...] = ("code", "math", "web")) -> list[Document]:
    """Deterministic pseudo-text over the tokenizer's words, with domains."""
    documents = []
    for i in range(n):
        length = 4 + (i * 7) % 19
        words = [WORDS[(i * 5 + j * j + j) % len(WORDS)] for j in range(length)]
        documents.append(Document(" ".join(words), domains[i % len(domains)]))
    return documents


def write_jsonl(path: Path, documents: list[Document]) -> Path:
    """The documents as a .jsonl dataset (``text`` and ``domain`` fields)."""
    path.write_text("".join(json.dumps({"text": d.text, "domain": d.domain}) + "\n" for d in documents))
    return path


# ----------------------------------------------------------------------------- weights


def make_tensors() -> dict[str, torch.Tensor]:
    """Ten small tensors of mixed dtypes with deterministic, non-trivial values."""
    import torch

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


def write_weights(folder: Path, tensors: dict[str, torch.Tensor], *, planned: bool = False, **kwargs: Any) -> Any:
    """Write ``tensors`` with :class:`moetool.io.shards.ShardWriter` (with or without a plan); returns the writer."""
    from moetool.io.dtypes import dtype_name
    from moetool.io.shards import PlannedEntry, ShardWriter

    plan = [PlannedEntry(n, dtype_name(t.dtype), tuple(t.shape)) for n, t in tensors.items()] if planned else None
    with ShardWriter(folder, plan, **kwargs) as writer:
        for name, tensor in tensors.items():
            writer.add(name, tensor)
    assert writer.result is not None
    return writer


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Read a folder the way transformers does: the index if present, else model.safetensors."""
    from safetensors.torch import load_file

    index_path = folder / "model.safetensors.index.json"
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


# ----------------------------------------------------------------------------- processes


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for a child Python process that imports this checkout's moetool."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# What the installed ``moetool`` console script runs.
_CONSOLE_ENTRY = "from moetool.cli import main; main()"


def cli_env(*, columns: int = 120, offline: bool = True, one_thread: bool = False, **extra: str) -> dict[str, str]:
    """The environment of a CLI run in a test: this checkout's moetool, no colour, a fixed terminal width, no
    MOETOOL_DEBUG from the caller's shell (``extra`` may set it), the Hub offline unless ``offline`` is false,
    and one OpenMP thread with ``one_thread`` (tiny models: a second thread costs more than the work)."""
    env = subprocess_env(NO_COLOR="1", COLUMNS=str(columns))
    env.pop("MOETOOL_DEBUG", None)
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    if one_thread:
        env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_cli(
    *args: str,
    columns: int = 120,
    env: dict[str, str] | None = None,
    offline: bool = True,
    one_thread: bool = False,
    module: bool = True,
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Run moetool in a fresh interpreter, as a user would: ``python -m moetool ARGS`` (``module=False``: the
    console-script entry, ``moetool.cli.main``), output captured as text. ``env`` adds to :func:`cli_env`."""
    entry = (
        [sys.executable, "-m", "moetool"] if module else [sys.executable, "-c", "from moetool.cli import main; main()"]
    )
    return subprocess.run(
        [*entry, *args],
        capture_output=True,
        text=True,
        env=cli_env(columns=columns, offline=offline, one_thread=one_thread, **(env or {})),
        cwd=ROOT,
        timeout=timeout,
    )
