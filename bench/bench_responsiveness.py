"""How fast the app answers while it works: page loads and progress polls of a running app (app.py in its own
process), idle first, then while the demo trains (model loading and caching included) and while a tiny BLIP
captions a folder, then with 20 API clients polling at once. Prints each phase's median and p90 and its ratio
to the idle answers of the same app in the same run.

    .venv/bin/python bench/bench_responsiveness.py [--steps 300] [--images 300]

Run it on an idle machine; the numbers are the web server's, so the trainer's own speed does not matter here.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_app import _call, _launch, _shut_down, _wait_until_up  # noqa: E402
from test_captioners import build_blip, make_images  # noqa: E402


def _timed(action) -> float:
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def _sample(url: str, session: str, seconds: float | None = None, count: int | None = None,
            busy=None) -> tuple[list[float], list[float]]:  # noqa: ANN001
    """Page and poll times, until `count` pairs, `seconds` pass, or `busy()` turns false."""
    pages, polls = [], []
    deadline = time.monotonic() + (seconds or 1e9)
    while time.monotonic() < deadline and (count is None or len(pages) < count):
        if busy is not None and not busy():
            break
        pages.append(_timed(lambda: urllib.request.urlopen(url, timeout=60).read()))
        polls.append(_timed(lambda: _call(url, "poll", session)))
        time.sleep(0.2)
    return pages, polls


def _line(name: str, seconds: list[float], idle: list[float]) -> str:
    if not seconds:
        return f"{name:<34} no samples"
    ordered = sorted(seconds)
    p90 = ordered[max(0, round(0.9 * len(ordered)) - 1)]
    ratio = statistics.median(seconds) / statistics.median(idle)
    return (f"{name:<34} n={len(seconds):<4} median {1000 * statistics.median(seconds):6.1f} ms  "
            f"p90 {1000 * p90:6.1f} ms  max {1000 * ordered[-1]:6.1f} ms  median/idle {ratio:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--images", type=int, default=300)
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-responsiveness-"))
    process, url, log = _launch(workdir)
    rows: list[str] = []
    try:
        _wait_until_up(url, process, timeout=180)
        idle_pages, idle_polls = _sample(url, "bench", count=40)
        rows += [_line("page, idle", idle_pages, idle_pages), _line("poll, idle", idle_polls, idle_polls)]

        from gradio_client import Client

        client = Client(url, verbose=False, download_files=False)
        client.predict(train_max_steps=args.steps, sample_every_steps=100, api_name="/start")
        status = lambda: client.predict(api_name="/poll")[0]  # noqa: E731
        pages, polls = _sample(url, "bench", seconds=600, busy=lambda: not status().startswith("running: step"))
        rows += [_line("page, building + loading + caching", pages, idle_pages),
                 _line("poll, building + loading + caching", polls, idle_polls)]
        pages, polls = _sample(url, "bench", count=40)
        rows += [_line("page, training", pages, idle_pages), _line("poll, training", polls, idle_polls)]
        with concurrent.futures.ThreadPoolExecutor(20) as pool:
            crowd = [t for ts in pool.map(lambda n: [_timed(lambda: _call(url, "poll", f"crowd-{n}"))
                                                     for _ in range(5)][1:], range(20)) for t in ts]
        rows.append(_line("poll, 20 clients at once (warm)", crowd, idle_polls))
        client.predict(api_name="/stop")
        while status().startswith(("running", "stopping", "starting")):
            time.sleep(0.5)

        model = build_blip(workdir / "blip")
        images = workdir / "to-caption"
        make_images(images, count=args.images)
        client.predict(dataset_path=str(images), caption_model="blip", caption_source=str(model),
                       caption_overwrite=True, api_name="/caption_start")
        captioning = lambda: client.predict(api_name="/caption_poll")[0].startswith(("loading", "captioning"))  # noqa: E731
        pages, polls = _sample(url, "bench", seconds=600, busy=captioning)
        rows += [_line("page, captioning", pages, idle_pages), _line("poll, captioning", polls, idle_polls)]
    finally:
        _shut_down(process, log)
    print(f"app responsiveness ({workdir}):")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
