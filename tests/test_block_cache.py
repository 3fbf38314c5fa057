"""Blocks on disk (lowvram.swap_from = "disk"): the demo trains to the same LoRA bit for bit as with its blocks in
RAM, a later run reuses the block cache without reading those blocks from the model, a damaged cache is named,
moved aside and rebuilt, a disk without room is refused with the size needed, and the staging ring reads ahead,
never evicts a block about to be used and reports reads nobody asked for in time."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.errors import UserError
from trainer.memory import block_store
from trainer.memory.block_store import BlockRecord, check_room
from trainer.memory.staging_ring import StagingRing
from trainer.session import Session
from trainer.spec import load_spec, resolve_paths

BASE = ["train.max_steps=2", "sample.prompts=[]", "train.mixed_precision='no'", "train.learning_rate=0.01",
        "lowvram.strategy='none'", "lowvram.blocks_to_swap=2", "output.save_state=false",
        "output.formats=['diffusers']"]


def _run(demo_dir: Path, out: Path, *settings: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    spec = resolve_paths(load_spec(demo_dir / "job.toml", [*BASE, f"output.dir='{out}'", *settings]), demo_dir)
    messages: list[str] = []
    session = Session(spec, emit=lambda e: messages.append(getattr(e, "message", "")))
    path = session.run()
    session.end()
    return load_file(path), messages


# An int8 base, as the presets that put blocks on disk quantise theirs: the cache holds the stored (quantised) bytes.
INT8 = "model.base_precision='int8'"
QUANTISED = "base transformer quantised to int8 while loading: "


@pytest.fixture(scope="module")
def ram_run(demo_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, torch.Tensor], list[str]]:
    return _run(demo_dir, tmp_path_factory.mktemp("ram"), INT8)


def _quantised_line(messages: list[str]) -> str:
    (line,) = [m for m in messages if m.startswith(QUANTISED)]
    return line


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_blocks_on_disk_train_the_same_lora_bit_for_bit_the_cache_is_reused_and_a_damaged_one_rebuilt(
        demo_dir: Path, tmp_path: Path, ram_run: tuple[dict[str, torch.Tensor], list[str]]) -> None:
    ram_lora, ram_messages = ram_run
    cache = tmp_path / "cache"
    disk = [INT8, f"data.cache_dir='{cache}'", "lowvram.swap_from='disk'"]
    first, messages = _run(demo_dir, tmp_path / "first", *disk)
    _same(first, ram_lora)
    (path,) = (cache / "blocks").glob("*.blocks")
    assert any("block cache written" in m for m in messages)
    # the log's sizes count the blocks written to the cache: the same transformer as with its blocks in RAM
    assert _quantised_line(messages) == _quantised_line(ram_messages)
    records = block_store.read_footer(path, path.stem)
    assert [r.index for r in records] == [0, 1]  # the two swapped blocks, nothing else
    second, messages = _run(demo_dir, tmp_path / "second", *disk)
    _same(second, ram_lora)
    assert any("block cache reused" in m for m in messages)
    assert _quantised_line(messages) == _quantised_line(ram_messages)  # blocks never read from the model count too
    with open(path, "r+b") as handle:  # one flipped byte inside block 0
        handle.seek(100)
        byte = handle.read(1)
        handle.seek(100)
        handle.write(bytes([byte[0] ^ 0xFF]))
    third, messages = _run(demo_dir, tmp_path / "third", *disk)
    _same(third, ram_lora)
    warning = next(m for m in messages if "damaged" in m)
    assert str(path) in warning and "block 0 does not match its checksum" in warning
    assert len(list((cache / "blocks").glob("*.blocks.damaged-*"))) == 1
    assert any("block cache written" in m for m in messages)
    block_store.verify(path, block_store.read_footer(path, path.stem))  # the rebuilt one is sound


def test_a_disk_without_room_is_refused_with_the_size_needed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Usage:
        free = 2 * 1024**3

    monkeypatch.setattr(block_store.shutil, "disk_usage", lambda folder: Usage())
    with pytest.raises(UserError) as caught:
        check_room(tmp_path / "blocks", 17.4 * 1024**3)
    message = str(caught.value)
    assert "lowvram.swap_from" in message and "17.4 GiB" in message and "2.0 GiB free" in message
    check_room(tmp_path / "blocks", 1024**3)  # room enough: no complaint


# ---------------------------------------------------------------------------------------------- the ring


def _cache_file(tmp_path: Path, blocks: int, size: int) -> tuple[Path, list[BlockRecord]]:
    path = tmp_path / "ring.blocks"
    records, data = [], b""
    for index in range(blocks):
        payload = bytes([index + 1]) * size
        records.append(BlockRecord(index, len(data), size, 0, ()))
        data += payload + b"\0" * (4096 - size % 4096)
    path.write_bytes(data)
    return path, records


def test_the_ring_reads_ahead_and_hands_each_block_its_own_bytes(tmp_path: Path) -> None:
    path, records = _cache_file(tmp_path, 6, 1000)
    ring = StagingRing(path, records, 2, lambda n: torch.empty(n, dtype=torch.uint8))
    try:
        for index in range(6):  # forward: each block asked for one ahead, as the swapper does
            staged = ring.acquire(index)
            assert staged.numel() == 1000 and bool((staged == index + 1).all())
            ring.release(index)
            if index + 1 < 6:
                assert ring.request(index + 1)
        assert ring.stats.demand_reads == 1 and ring.stats.reads == 6  # only the first was not read ahead
        for index in range(5, -1, -1):  # and back, as the backward recomputes
            staged = ring.acquire(index)
            assert bool((staged == index + 1).all())
            ring.release(index)
            if index:
                ring.request(index - 1)
        assert ring.stats.demand_reads == 1  # block 5 was still staged at the turn: no read at all
    finally:
        ring.close()


def test_a_staged_block_is_never_overwritten_before_it_is_used(tmp_path: Path) -> None:
    path, records = _cache_file(tmp_path, 4, 64)
    ring = StagingRing(path, records, 2, lambda n: torch.empty(n, dtype=torch.uint8))
    try:
        assert ring.request(0) and ring.request(1)
        assert not ring.request(2)  # both slots hold blocks nobody has used yet: the read-ahead waits
        staged = ring.acquire(2)  # a demand read takes the oldest unused read-ahead instead of blocking forever
        assert bool((staged == 3).all()) and ring.stats.demand_reads == 1
        ring.release(2)
        assert bool((ring.acquire(1) == 2).all())  # block 1 was kept
    finally:
        ring.close()


def test_the_copy_must_finish_before_its_slot_is_read_into_again(tmp_path: Path) -> None:
    path, records = _cache_file(tmp_path, 3, 64)

    class Copy:  # a device copy still in flight: the reader waits for it (a CUDA event on a GPU)
        def __init__(self) -> None:
            self.finished = threading.Event()
            self.waited = False

        def synchronize(self) -> None:
            self.waited = True
            self.finished.wait(5)

    ring = StagingRing(path, records, 1, lambda n: torch.empty(n, dtype=torch.uint8))
    try:
        ring.acquire(0)
        copy = Copy()
        ring.release(0, copy)
        ring.request(1)
        threading.Timer(0.05, copy.finished.set).start()
        assert bool((ring.acquire(1) == 2).all()) and copy.waited
    finally:
        ring.close()


def test_a_read_that_fails_is_reported_with_the_block(tmp_path: Path) -> None:
    path, records = _cache_file(tmp_path, 2, 64)
    os.truncate(path, 64)  # block 1 is gone
    ring = StagingRing(path, records, 2, lambda n: torch.empty(n, dtype=torch.uint8))
    try:
        with pytest.raises(RuntimeError, match="reading block 1 failed"):
            ring.acquire(1)
    finally:
        ring.close()
