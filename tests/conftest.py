"""Fixtures shared by several test files (helpers that are plain functions live in ``tests/helpers.py``).

Markers (declared in pyproject.toml): ``slow`` for tests the default run skips (the CI default must finish
in minutes on 2 cores), ``gpu`` for tests that need CUDA, ``network`` for tests that need the Hub.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a whole test module: the tensors are tiny, so handing work to a second thread costs
    more than the work, and on a busy 2-core machine an OpenMP barrier can wait a whole scheduler time slice.
    Use it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
