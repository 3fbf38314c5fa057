"""lowvram.empty_cache_every: the allocator cache is released every N steps, and the log says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_demo_session
from trainer.memory.cache_release import CacheRelease
from trainer.spec import SpecError, load_spec


def test_released_every_n_steps_and_logged(demo_dir: Path, tmp_path: Path) -> None:
    session, messages = run_demo_session(demo_dir, ["train.max_steps=5", f"output.dir='{tmp_path}'",
                                                    "lowvram.empty_cache_every=2"])
    assert session.cache_release.count == 2  # steps 2 and 4 of 5
    assert any("empty_cache_every = 2: released the cache 2 times" in m for m in messages)


def test_cpu_release_is_counted_but_frees_nothing() -> None:
    release = CacheRelease(every=3, device_type="cpu")
    assert [step for step in range(1, 10) if release.due(step)] == [3, 6, 9]
    assert release.release() == 0 and release.count == 1
    assert not CacheRelease(every=0, device_type="cpu").due(5)


def test_negative_interval_is_refused(demo_dir: Path) -> None:
    with pytest.raises(SpecError, match=r"lowvram\.empty_cache_every"):
        load_spec(demo_dir / "job.toml", ["lowvram.empty_cache_every=-1"])
