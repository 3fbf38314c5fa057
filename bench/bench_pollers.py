"""What watchers cost a run: the demo's training speed (steps/s) while 1 page and while 20 pages poll the Run tab,
in one run of the app (app.py in its own process, the demo training in the app's trainer process).

Each watcher polls once a second as an open page's timer does (--via page, the default): the run's state from the
app's route /studio/run/state with the ETag it last got (304 while unchanged), on a connection it keeps open as a
browser does, and the loss plot, CLIP plot and log only when the state names a new version of them. --via api
polls gradio's /poll API instead (a gradio request per poll, as the page did before the route). The phases
alternate (1, 20, 1, 20 watchers) so a drift in the machine's speed shows; the ratio is the 20-watcher speed over
the 1-watcher speed, medians of the phases, with the polls' response times, the machine's load average, and the CPU
the app's web server used (its own process, without the trainer process): in all, and the extra per poll over the
1-watcher phase (what each further watcher costs).

    .venv/bin/python bench/bench_pollers.py [--seconds 20] [--watchers 20] [--rounds 2] [--via page|api]

Run it on an idle machine (inside `flock /tmp/bigrun.lock` on a shared one): the watchers' HTTP clients run in this
process, on the same cores as the app and the trainer, as they would not for real viewers.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_app import _call, _launch, _shut_down, _wait_until_up  # noqa: E402

STEPS = 1_000_000  # the demo never finishes during the bench
STEP = re.compile(r"running: step (\d+)/")


class Watchers:
    """`count` sessions polling once a second until stopped; watcher 0's answers give (time, step)."""

    def __init__(self, url: str, count: int, tag: str, via: str = "page") -> None:
        self.url, self.count, self.tag, self.via = url, count, tag, via
        self.stop = threading.Event()
        self.steps: list[tuple[float, int]] = []
        self.seconds: list[float] = []
        self.threads = [threading.Thread(target=self._watch, args=(n,), daemon=True) for n in range(count)]

    def _watch(self, number: int) -> None:
        session = f"{self.tag}-{number}"
        page = PagePoller(self.url) if self.via == "page" else None
        while not self.stop.is_set():
            began = time.perf_counter()
            status = page.poll() if page else _call(self.url, "poll", session)[0]
            took = time.perf_counter() - began
            self.seconds.append(took)
            found = STEP.match(status)
            if number == 0 and found:
                self.steps.append((time.monotonic(), int(found.group(1))))
            self.stop.wait(max(0.0, 1.0 - took))

    def __enter__(self) -> Watchers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def steps_per_second(self, warm: float) -> float:
        """From watcher 0's first answer `warm` seconds in (sessions set up, first full answers sent) to its last."""
        start = self.steps[0][0] + warm
        kept = [(when, step) for when, step in self.steps if when >= start]
        (t0, s0), (t1, s1) = kept[0], kept[-1]
        return (s1 - s0) / (t1 - t0)


class PagePoller:
    """What an open page's timer fetches each second (ui/run_tab.py POLL_JS), on one kept-open connection."""

    def __init__(self, url: str) -> None:
        address = url.split("//", 1)[1].strip("/")
        self.connection = http.client.HTTPConnection(address, timeout=30)
        self.known: dict[str, str] = {"state": "", "plot": "", "clip": "", "log": ""}
        self.status = ""

    def _get(self, part: str, etag: str) -> tuple[int, str, bytes]:
        self.connection.request("GET", f"/studio/run/{part}", headers={"If-None-Match": etag} if etag else {})
        answer = self.connection.getresponse()
        return answer.status, answer.getheader("ETag", ""), answer.read()

    def poll(self) -> str:
        status, etag, body = self._get("state", self.known["state"])
        if status == 200:
            state = json.loads(body)
            self.known["state"], self.status = etag, state["status_text"]
            for part in ("plot", "clip", "log"):
                if state[part] != self.known[part]:
                    self.known[part] = self._get(part, "")[1]
        return self.status


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--watchers", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--via", choices=("page", "api"), default="page",
                        help="poll as the page does (the app's route) or through gradio's /poll API")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bench-pollers-"))
    process, url, log = _launch(workdir)
    speeds: dict[int, list[float]] = {1: [], args.watchers: []}
    polls: dict[int, list[float]] = {1: [], args.watchers: []}
    server_cpu: dict[int, list[float]] = {1: [], args.watchers: []}  # the web server's CPU, % of one core
    per_poll: dict[int, list[float]] = {1: [], args.watchers: []}  # the web server's CPU ms per poll answered
    extra_per_poll: list[float] = []  # the web server's CPU ms per poll over the 1-watcher phase before
    loads: list[float] = []  # the machine's 1-minute load average at the end of each phase
    rates: dict[int, tuple[float, float]] = {}  # the last phase's web server CPU s/s and polls/s, by watchers
    import psutil

    server = psutil.Process(process.pid)
    try:
        _wait_until_up(url, process, timeout=180)
        from gradio_client import Client

        client = Client(url, verbose=False, download_files=False)
        client.predict(train_max_steps=STEPS, sample_every_steps=0, api_name="/start")
        deadline = time.monotonic() + 600
        while not STEP.match(_call(url, "poll", "bench-wait")[0]) and time.monotonic() < deadline:
            time.sleep(1.0)  # the demo builds, the models load, the latents are cached
        time.sleep(5.0)  # the first steps (allocations, compiled kernels) are slower
        for round_number in range(args.rounds):
            for count in (1, args.watchers):
                with Watchers(url, count, f"r{round_number}-w{count}", args.via) as watchers:
                    time.sleep(3.0)  # the sessions set up
                    before, began, answered = server.cpu_times(), time.monotonic(), len(watchers.seconds)
                    time.sleep(args.seconds - 3.0)
                    after, took, answered = server.cpu_times(), time.monotonic() - began, \
                        len(watchers.seconds) - answered
                used = after.user + after.system - before.user - before.system
                server_cpu[count].append(100 * used / took)
                per_poll[count].append(1000 * used / max(answered, 1))
                loads.append(os.getloadavg()[0])
                rates[count] = (used / took, answered / took)  # CPU seconds and polls, per second
                if count == args.watchers and 1 in rates:
                    (cpu_many, polls_many), (cpu_one, polls_one) = rates[count], rates[1]
                    extra_per_poll.append(1000 * (cpu_many - cpu_one) / max(polls_many - polls_one, 1e-9))
                speed = watchers.steps_per_second(warm=3.0)
                speeds[count].append(speed)
                polls[count] += watchers.seconds
                print(f"round {round_number + 1}: {count:>2} watchers  {speed:6.2f} steps/s  poll median "
                      f"{1000 * statistics.median(watchers.seconds):6.1f} ms  web server CPU "
                      f"{server_cpu[count][-1]:5.1f} % ({per_poll[count][-1]:5.1f} ms a poll)  load {loads[-1]:.2f}",
                      flush=True)
        client.predict(api_name="/stop")
    finally:
        _shut_down(process, log)
    one, many = statistics.median(speeds[1]), statistics.median(speeds[args.watchers])
    print(f"demo training with watchers polling once a second via the {args.via} ({workdir}):")
    for count, speed in ((1, one), (args.watchers, many)):
        ordered = sorted(polls[count])
        p90 = ordered[max(0, round(0.9 * len(ordered)) - 1)]
        print(f"  {count:>2} watchers: {speed:6.2f} steps/s (median of {len(speeds[count])} phases); poll median "
              f"{1000 * statistics.median(ordered):6.1f} ms, p90 {1000 * p90:6.1f} ms; web server CPU "
              f"{statistics.median(server_cpu[count]):5.1f} % of a core, {statistics.median(per_poll[count]):5.1f} ms "
              "a poll")
    print(f"  web server CPU per poll over the 1-watcher phase: {statistics.median(extra_per_poll):5.2f} ms "
          f"(median of {len(extra_per_poll)} rounds)")
    ratios = sorted(b / a for a, b in zip(speeds[1], speeds[args.watchers], strict=True))
    print(f"  ratio of each round ({args.watchers} watchers / the 1 watcher just before): "
          f"{', '.join(f'{ratio:.3f}' for ratio in ratios)}; median {statistics.median(ratios):.3f}")
    print(f"  ratio {args.watchers} watchers / 1 watcher: {many / one:.3f} (cost of the watchers: "
          f"{100 * (1 - many / one):.1f} %); load average {min(loads):.2f}-{max(loads):.2f} "
          f"(median {statistics.median(loads):.2f}) on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
