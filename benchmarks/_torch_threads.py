"""Thread control shared by the speed benchmarks.

Imported by them, not a ``conftest.py``: that module name would clash with ``tests/conftest.py``
when both folders are collected in one session.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` intra-op torch threads, restoring the previous number after."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (timings comparable on a shared machine)."""
    with torch_threads(1):
        yield
