"""Shared pytest setup: the repository root on sys.path and a one-thread torch fixture."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


@pytest.fixture(scope="module")
def one_thread():
    """Run torch on one intra-op thread for the module, then restore the previous setting.

    The training tests use tiny networks (digits, 8x8): a second thread barely helps, and on a
    shared 2-core machine thread oversubscription makes them several times slower. It also
    keeps an in-process run and a ``OMP_NUM_THREADS=1`` subprocess numerically identical.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def poll_process(ready, proc, what: str, timeout: float, output, interval: float = 0.05,
                 name: str = "the process") -> None:
    """Wait until ``ready()`` holds while the subprocess ``proc`` runs; fail (with the tail of
    ``output()``) if it ends first, and kill it and fail after ``timeout`` s (a hang guard, not
    a timing assertion)."""
    import time

    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"{name} ended before {what}:\n{output()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"no {what} after {timeout} s")
        time.sleep(interval)
