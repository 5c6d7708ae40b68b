"""Training windows, the order they are read in, and the held-out split.

The training text is tokenized once into windows of exactly ``seq_len`` tokens (documents packed one domain
at a time, as everywhere in moetool: :func:`moetool.data.iter_windows`; the short remainders are left
out so that every batch is full and unpadded). The order is a pure function of the seed and of the
position in the stream of windows: epoch ``e`` reads the windows in a permutation drawn from a generator
seeded with ``(seed, e)``. A checkpoint therefore needs only the number of windows consumed to continue
with exactly the batches an uninterrupted run would have seen, whatever the number of processes.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from moetool.errors import DatasetError

if TYPE_CHECKING:
    import torch

    from moetool.data import Document

#: Without --eval-dataset, one document in this many is held out of training for the perplexities.
HELDOUT_EVERY = 20


def split_heldout(documents: Sequence[Document], every: int = HELDOUT_EVERY) -> tuple[list[Document], list[Document]]:
    """Hold out every ``every``-th document (the last of each run of ``every``) for evaluation.

    Taking documents spread over the whole dataset keeps the held-out part's mix of domains and sources
    like the training part's, where a tail cut would take only what the file happens to end with.

    Returns:
        ``(train, heldout)``; ``heldout`` is empty when there are fewer than ``every`` documents.
    """
    train = [d for i, d in enumerate(documents) if i % every != every - 1]
    heldout = [d for i, d in enumerate(documents) if i % every == every - 1]
    return train, heldout


@dataclass
class TrainData:
    """The training windows and what identifies them.

    Attributes:
        windows: ``[N, seq_len]`` token ids (int32, to halve the memory of a large dataset).
        documents: documents read.
        tokens: tokens in the windows (``N * seq_len``).
        fingerprint: SHA-256 of the token ids: a resumed run must see the same data.
    """

    windows: torch.Tensor
    documents: int
    tokens: int
    fingerprint: str
    _orders: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def num_windows(self) -> int:
        """N, the windows in one epoch."""
        return int(self.windows.shape[0])

    def epoch_order(self, epoch: int, seed: int) -> torch.Tensor:
        """The permutation of window ids read in ``epoch``."""
        import torch

        order = self._orders.get((seed, epoch))
        if order is None:
            generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
            order = torch.randperm(self.num_windows, generator=generator)
            # Two epochs are all a run ever needs at once (the current one and the next).
            if len(self._orders) > 2:
                self._orders.clear()
            self._orders[(seed, epoch)] = order
        return order

    def window_ids(self, start: int, count: int, seed: int) -> list[int]:
        """The window ids at stream positions ``start .. start + count - 1``."""
        ids: list[int] = []
        n = self.num_windows
        for position in range(start, start + count):
            ids.append(int(self.epoch_order(position // n, seed)[position % n]))
        return ids

    def batch(self, ids: Sequence[int]) -> torch.Tensor:
        """``[len(ids), seq_len]`` int64 token ids."""
        import torch

        return self.windows[torch.as_tensor(list(ids), dtype=torch.long)].long()


def build_train_data(
    tokenizer: Any, documents: Sequence[Document], *, seq_len: int, max_tokens: int | None, name: str
) -> TrainData:
    """Tokenize ``documents`` into full windows of ``seq_len`` tokens.

    Raises:
        DatasetError: ``DATASET_TOO_SMALL`` when the text does not fill one window.
    """
    import torch

    from moetool.data import iter_windows

    rows: list[list[int]] = []
    for window in iter_windows(tokenizer, documents, seq_len=seq_len, max_tokens=max_tokens):
        if len(window.input_ids) == seq_len:
            rows.append(window.input_ids)
    if not rows:
        raise DatasetError(
            f"the training text of {name} does not fill one window of {seq_len} tokens",
            hint="use more text, or a smaller --seq-len",
            code="DATASET_TOO_SMALL",
        )
    windows = torch.tensor(rows, dtype=torch.int32)
    digest = hashlib.sha256(windows.numpy().tobytes()).hexdigest()
    return TrainData(windows=windows, documents=len(documents), tokens=int(windows.numel()), fingerprint=digest)
