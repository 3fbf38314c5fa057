"""bench/rehearse.py cuts the trainer's memory into phases as they happen: the phases before training from its
console lines (its events file is written only once training starts), training and its steps from the events."""

import json
import os
import time

from bench.rehearse import Watcher


def test_phases_come_from_the_console_and_the_two_loads_have_their_own_rows(tmp_path):
    log, events = tmp_path / "train.log", tmp_path / "events.jsonl"
    watcher = Watcher(os.getpid(), events, log)
    watcher.start()
    lines = ["info: low-VRAM plan: ...", "[checking dataset] 1 folder(s)", "[loading] /work/fab/model",
             "[caching text embeddings] 2 prompts", "[caching latents] 4 images", "[caching latents] 2/4 images",
             "[loading] transformer (fp8)"]
    for line in lines:
        with open(log, "a", encoding="utf-8") as out:
            out.write(line + "\n")
        time.sleep(0.12)
    # the events file arrives all at once: the earlier phases again (ignored), then training live
    held = [{"event": "phase", "phase": p, "detail": ""} for p in ("loading", "caching latents")]
    live = [{"event": "phase", "phase": "training", "detail": "steps 1–2"},
            {"event": "progress", "step_seconds": 3.5}]
    events.write_text("".join(json.dumps(e) + "\n" for e in held + live), encoding="utf-8")
    for line in ("[saving] rehearsal at step 2 (diffusers)", "[sampling] 1 prompts at step 2"):
        time.sleep(0.15)
        with open(log, "a", encoding="utf-8") as out:
            out.write(line + "\n")
    time.sleep(0.15)
    watcher.done.set()
    watcher.join()
    assert list(watcher.peaks) == ["starting", "checking dataset", "loading", "caching text embeddings",
                                   "caching latents", "loading transformer", "training step", "saving", "sampling"]
    assert watcher.steps == [3.5]
    # the kernel's peak, reset as each phase starts, is never below what the samples saw in the phase
    seen = [phase for phase in watcher.peaks if phase in watcher.high]
    assert seen and all(watcher.high[phase] >= watcher.peaks[phase]["VmRSS"] for phase in seen)
    assert 0.2 < watcher.seconds["caching latents"] < 0.6  # both of its lines: one phase
