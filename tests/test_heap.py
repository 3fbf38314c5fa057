"""Freed heap memory goes back to the OS after a model's streamed load or release (trainer/memory/heap.py)."""

import sys
from pathlib import Path

import pytest
import torch

from trainer.memory import heap


def _anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no RssAnon")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="needs Linux's /proc and glibc's malloc_trim")
def test_freed_holes_between_kept_tensors_leave_the_resident_memory():
    # 64 KiB tensors come from the heap; freeing every other one leaves holes that glibc keeps resident
    tensors = [torch.ones(16 * 1024) for _ in range(2000)]
    kept = tensors[1::2]
    del tensors
    before = _anon()
    assert heap.release_freed_heap()
    assert before - _anon() > 40 * 1024**2  # of 62.5 MiB freed: every whole page of each hole
    assert all(float(t[0]) == 1.0 for t in kept[:10])  # what is kept is untouched


def test_the_trimmer_trims_once_per_block_worth_of_bytes(monkeypatch):
    calls = []
    monkeypatch.setattr(heap, "release_freed_heap", lambda: calls.append(1) or True)
    trimmer = heap.HeapTrimmer(every_bytes=100)
    for _ in range(7):
        trimmer.add(30)  # 210 bytes: one trim once 120 are in, then 90 pending
    assert len(calls) == 1 and trimmer.pending == 90
    trimmer.flush()
    assert len(calls) == 2 and trimmer.pending == 0
