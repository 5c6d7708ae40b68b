"""The teacher's top-k log-probabilities per training token, on disk, so the teacher need not stay in memory.

Before training, the teacher runs once over every window the run will read; for each position that
predicts a next token it stores the ``k`` most likely tokens' ids and log-probabilities at the KD
temperature, and the log of the probability mass of all other tokens (so the KL can treat them as one
outcome, see :func:`moetool.distill.loss.kl_topk_per_position`). The teacher is then freed and training
reads the cache.

Storage: three ``.npy`` arrays memory-mapped by window id (``[windows, seq_len - 1, k]`` float16
log-probabilities, uint16 or int32 ids, ``[windows, seq_len - 1]`` float32 rest mass) and a JSON file
that says what they hold (k, temperature, the data's fingerprint, the teacher) and whether they are
complete. The arrays are plain ``.npy`` files: no pickle is ever written or read. A cache that does not
match the run, or was interrupted, is rebuilt.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np
    import torch

META_NAME = "teacher-topk.json"
LOGPROBS_NAME = "teacher-topk-logprobs.npy"
INDICES_NAME = "teacher-topk-indices.npy"
REST_NAME = "teacher-topk-rest.npy"
FORMAT = "moetool-distill-teacher-topk"
VERSION = 1


@dataclass
class TeacherCache:
    """An open cache (arrays memory-mapped)."""

    folder: Path
    meta: dict[str, Any]
    logprobs: np.ndarray
    indices: np.ndarray
    rest: np.ndarray

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    def write(self, window_ids: Sequence[int], logits: torch.Tensor, temperature: float) -> None:
        """Store the top-k of ``logits`` (``[b, seq_len, V]``, one row per window id)."""
        import torch

        scaled = logits[:, :-1].float() / temperature
        log_p = torch.log_softmax(scaled, dim=-1)
        values, indices = log_p.topk(self.k, dim=-1)
        rest = torch.logsumexp(log_p.scatter(-1, indices, float("-inf")), dim=-1)
        rows = list(window_ids)
        self.logprobs[rows] = values.clamp(min=-6.0e4).to(torch.float16).cpu().numpy()
        self.indices[rows] = indices.cpu().numpy().astype(self.indices.dtype)
        self.rest[rows] = rest.cpu().numpy()

    def read(self, window_ids: Sequence[int], device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logprobs [b, seq_len - 1, k], indices [b, seq_len - 1, k], rest [b, seq_len - 1])`` on ``device``."""
        import numpy as np
        import torch

        rows = list(window_ids)
        logprobs = torch.from_numpy(np.ascontiguousarray(self.logprobs[rows])).float()
        indices = torch.from_numpy(np.ascontiguousarray(self.indices[rows]).astype(np.int64))
        rest = torch.from_numpy(np.ascontiguousarray(self.rest[rows]))
        return logprobs.to(device), indices.to(device), rest.to(device)

    def flush(self) -> None:
        for array in (self.logprobs, self.indices, self.rest):
            array.flush()

    def mark_complete(self) -> None:
        """Record that every needed window is stored (written last, so a crash leaves it incomplete)."""
        self.flush()
        self.meta["complete"] = True
        _write_meta(self.folder, self.meta)


def _write_meta(folder: Path, meta: dict[str, Any]) -> None:
    from moetool.io.writer import write_json

    tmp = folder / f".{META_NAME}.tmp-{os.getpid()}"
    write_json(tmp, meta)
    os.replace(tmp, folder / META_NAME)


def expected_meta(
    *, k: int, temperature: float, fingerprint: str, teacher: str, windows: int, seq_len: int, vocab: int
) -> dict[str, Any]:
    """What a cache for this run must say it holds."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "k": k,
        "temperature": temperature,
        "data_fingerprint": fingerprint,
        "teacher": teacher,
        "windows": windows,
        "seq_len": seq_len,
        "vocab": vocab,
    }


def open_cache(folder: Path, expected: dict[str, Any]) -> TeacherCache | None:
    """The complete cache in ``folder`` if it matches ``expected``; None otherwise."""
    import numpy as np

    try:
        meta = json.loads((folder / META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or not meta.get("complete"):
        return None
    if any(meta.get(key) != value for key, value in expected.items()):
        return None
    try:
        arrays = [np.load(folder / name, mmap_mode="r", allow_pickle=False) for name in (LOGPROBS_NAME, INDICES_NAME)]
        rest = np.load(folder / REST_NAME, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):
        return None
    shape = (expected["windows"], expected["seq_len"] - 1, expected["k"])
    if arrays[0].shape != shape or arrays[1].shape != shape or rest.shape != shape[:2]:
        return None
    return TeacherCache(folder, meta, arrays[0], arrays[1], rest)


def create_cache(folder: Path, expected: dict[str, Any], *, create: bool) -> TeacherCache:
    """New arrays for ``expected`` (the main process creates them; the others open them for writing)."""
    import numpy as np
    from numpy.lib.format import open_memmap

    folder.mkdir(parents=True, exist_ok=True)
    shape = (expected["windows"], expected["seq_len"] - 1, expected["k"])
    index_dtype = np.uint16 if expected["vocab"] <= 2**16 else np.int32
    mode = "w+" if create else "r+"
    if create:
        (folder / META_NAME).unlink(missing_ok=True)
        logprobs = open_memmap(folder / LOGPROBS_NAME, mode=mode, dtype=np.float16, shape=shape)
        indices = open_memmap(folder / INDICES_NAME, mode=mode, dtype=index_dtype, shape=shape)
        rest = open_memmap(folder / REST_NAME, mode=mode, dtype=np.float32, shape=shape[:2])
    else:
        logprobs = open_memmap(folder / LOGPROBS_NAME, mode=mode)
        indices = open_memmap(folder / INDICES_NAME, mode=mode)
        rest = open_memmap(folder / REST_NAME, mode=mode)
    return TeacherCache(folder, {**expected, "complete": False}, logprobs, indices, rest)


def fill_cache(
    cache: TeacherCache,
    teacher: Any,
    batches: Iterable[tuple[list[int], torch.Tensor]],
    *,
    temperature: float,
    on_batch: Callable[[int], None] | None = None,
) -> None:
    """Run the teacher over ``(window_ids, input_ids)`` batches and store their top-k.

    Args:
        cache: the open cache.
        teacher: a runner (:class:`moetool.runner.StreamedModel`, one layer at a time over all the windows;
            :class:`moetool.runner.WholeModel`) or a transformers model.
        batches: window ids and their full-length token ids.
        temperature: the KD temperature the log-probabilities are taken at.
        on_batch: called with each batch's token count once its top-k is stored.
    """
    import torch

    from moetool.data import Batch
    from moetool.runner.stream import StreamedModel, WholeModel

    runner = teacher if isinstance(teacher, (StreamedModel, WholeModel)) else WholeModel(teacher)
    window_ids: dict[int, list[int]] = {}

    def as_batches() -> Iterator[Batch]:
        for index, (ids, input_ids) in enumerate(batches):
            window_ids[index] = list(ids)
            yield Batch(input_ids, torch.ones_like(input_ids), [None] * len(ids))

    with torch.no_grad():
        for index, batch, logits in runner.logits_batches(as_batches()):
            cache.write(window_ids.pop(index), logits, temperature)
            if on_batch is not None:
                on_batch(int(batch.input_ids.numel()))
    cache.flush()
