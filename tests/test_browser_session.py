"""One chromium session through the Run tab's workflow on the prebuilt demo (a job file names it, so nothing is
built): Train N steps, End training ("ended"), then the resume offer on every load and in a second browser; a Start
over the run asks (on several GPUs too); Continue goes on with the plot and samples from before, the samples showing
whole labels; a refused Start is the status line until the form is fixed. The job bar and the buttons of an idle Run
tab: tests/test_browser_job_bar.py (its own app, so the two can run on different workers).

Screenshots of each stage go to a folder under the test's tmp dir (its path is printed).
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from test_app import _launch, _shut_down, _wait_until_up
from test_browser import CHROMIUM, CHROMIUM_ARGS, Shots

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM} "
                                                     "(apt-get install chromium)"),
]
WAIT_MS = 90_000
RUN_MS = 300_000  # a step of the demo's run: the trainer process loads torch first (minutes on a busy machine)
VIEWPORT = {"width": 1400, "height": 1000}

DEMO_JOB = """[model]
family = "flux2"
flavour = "demo"
source = "{demo}/flux2"
base_precision = "fp32"
text_encoder_precision = "fp32"
[lora]
rank = 4
alpha = 4.0
[[data.datasets]]
path = "{demo}/dataset"
trigger = "shapez"
[data]
resolution = 64
[train]
max_steps = 6
batch_size = 2
learning_rate = 0.005
mixed_precision = "no"
[sample]
prompts = ["shapez a red circle on a blue background, with a long label to show whole"]
every_steps = 2
steps = 2
[output]
dir = "output/run"
name = "demo_lora"
"""
BUTTONS = """() => Object.fromEntries(Array.from(document.querySelectorAll('button[id^="run-"]'))
    .map(b => [b.id, [b.disabled, b.title]]))"""
TRUNCATED_CAPTIONS = """() => Array.from(document.querySelectorAll('#run-samples .caption, #run-samples figcaption'))
    .filter(c => c.scrollWidth > c.clientWidth + 1 || c.scrollHeight > c.clientHeight + 1).length"""
# How the gallery shows its samples: [pictures, labels cut or over their picture, the grid scrolls (hides some)].
GALLERY = """() => { const items = Array.from(document.querySelectorAll('#run-samples .thumbnail-item'));
    const wrap = document.querySelector('#run-samples .grid-wrap');
    const bad = items.filter(item => { const img = item.querySelector('img');
        const label = item.querySelector('.caption-label'); if (!label) return true;
        const i = img.getBoundingClientRect(), l = label.getBoundingClientRect();
        return l.top < i.bottom - 1 || label.scrollWidth > label.clientWidth + 1
            || label.scrollHeight > label.clientHeight + 1; });
    return [items.length, bad.length, wrap.scrollHeight > wrap.clientHeight + 1]; }"""


@contextmanager
def studio_in_chromium(workdir: Path, demo_dir: Path) -> Iterator[tuple[object, object, str]]:
    """The app on `workdir` (jobs/demo.toml written there, the demo's folder allowed, CPU processes offered so the
    "Several GPUs" section shows) and chromium on its page: (browser, page, url). The app's log must end with no
    traceback."""
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)  # a busy machine: the trainer process alone takes tens of seconds to load
    (workdir / "jobs").mkdir()
    (workdir / "jobs" / "demo.toml").write_text(DEMO_JOB.format(demo=demo_dir), encoding="utf-8")
    process, url, log = _launch(workdir, "--allow", str(demo_dir), env={"FLUX_STUDIO_CPU_PROCESSES": "1"})
    try:
        with sync_playwright() as playwright:
            # chromium starts while the app does
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport=VIEWPORT)
                page.set_default_timeout(WAIT_MS)
                _wait_until_up(url, process, timeout=120)
                page.goto(url)
                yield browser, page, url
            finally:
                browser.close()
    finally:
        _shut_down(process, log)
    app_log = (workdir / "app.log").read_text()
    assert "Traceback" not in app_log, app_log[-3000:]


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Iterator[tuple[object, object, str, Path]]:
    workdir = tmp_path_factory.mktemp("run-workflow")
    with studio_in_chromium(workdir, demo_dir) as (browser, page, url):
        yield browser, page, url, workdir


def load_job(page, name: str) -> None:  # noqa: ANN001 - a playwright Page
    """Load jobs/`name` with the job bar."""
    from playwright.sync_api import expect

    page.locator("#job-path textarea, #job-path input").first.fill(f"jobs/{name}")
    page.get_by_role("button", name="Load job", exact=True).click()
    expect(page.locator("#job-notice")).to_contain_text(f"loaded {name}")


def test_the_run_workflow_in_chromium(studio, tmp_path: Path):
    from playwright.sync_api import expect

    browser, page, url, workdir = studio
    shot = Shots(tmp_path / "screenshots")
    out = workdir / "jobs" / "output" / "run"  # the job's relative output.dir, from the job file's folder
    load_job(page, "demo.toml")
    shot.stage("loaded")
    page.get_by_role("tab", name="Run", exact=True).click()

    status = page.get_by_label("Status", exact=True)
    steps = page.get_by_label("Steps to train now", exact=True)
    steps.fill("3")
    steps.press("Tab")
    page.locator("#run-train").click()
    expect(status).to_have_value(re.compile(r"^paused at step 3 "), timeout=RUN_MS)
    shot.stage("paused")
    expect(page.locator("#run-start")).to_be_disabled()
    assert page.evaluate(BUTTONS)["run-start"][1].startswith("a session is paused at step 3")
    page.locator("#run-end").click()
    expect(status).to_have_value(re.compile(r"^ended: LoRA saved to "), timeout=RUN_MS)
    offer = page.locator("#resume-offer")
    expect(offer).to_be_visible()
    expect(page.locator("#run-resume")).to_have_text("Continue at step 3")
    shot(page, "02-ended")

    for _ in range(3):  # the offer on every load (it showed on about half of them)
        page.reload()
        page.get_by_role("tab", name="Run", exact=True).click()
        expect(offer).to_be_visible()
    shot.stage("reloaded")
    expect(steps).to_have_value("3")  # N survives a reload
    other = browser.new_page(viewport=VIEWPORT)
    other.goto(url)
    other.get_by_role("tab", name="Run", exact=True).click()
    expect(other.locator("#resume-offer")).to_be_visible()
    other.close()
    shot.stage("second-browser")

    # Over a resumable run, Start on several GPUs asks as Start does, with its own answers.
    page.locator("#multi-gpu").get_by_text("Several GPUs").first.click()
    ask = page.locator("#multi-gpu-ask")
    expect(ask).to_be_visible()
    expect(page.locator("#multi-gpu-resume")).to_have_text("Continue at step 3 on several GPUs")
    page.locator("#multi-gpu-start").click()
    asked = re.compile(r"^not started: a run stopped at step 3 .*Start a new run")
    expect(status).to_have_value(asked)
    expect(page.get_by_label("Problems", exact=True)).to_have_value(asked)
    page.locator("#run-start").click()  # over a resumable run: asks
    expect(status).to_have_value(asked)
    assert not (out / "earlier_runs").exists() and (out / "state").is_dir()
    assert not (out / "job.toml").exists()  # the launch's job is written only when it starts
    shot.stage("asked")
    page.locator("#run-resume").click()
    expect(status).to_have_value(re.compile(r"^completed: LoRA saved to "), timeout=RUN_MS)
    shot.stage("completed")
    assert not (out / "earlier_runs").exists()
    expect(offer).to_be_hidden()
    expect(ask).to_be_hidden()
    # the samples of steps 0 and 2 from before the resume, then 4 and 6: every one shown (the gallery grows), each
    # label whole and under its picture
    page.wait_for_function("() => document.querySelectorAll('#run-samples img').length >= 4")
    assert page.evaluate(TRUNCATED_CAPTIONS) == 0, "a sample's label is cut off"
    shown, bad, scrolls = page.evaluate(GALLERY)
    assert shown >= 4 and bad == 0 and not scrolls, (shown, bad, scrolls)
    memory = page.locator("#run-memory").inner_text()  # the machine's RAM apart from the trainer's
    assert "machine RAM (all programs)" in memory and "trainer RAM" not in memory, memory
    shot(page, "03-resumed")

    # A refused Start is the status line; the problems go once the form is fixed.
    page.get_by_role("tab", name="Training").click()
    rank = page.get_by_label("Rank", exact=True)
    rank.fill("0")
    rank.press("Tab")
    # checked as typed, in the page's words
    expect(page.locator(".toast-body").filter(has_text="Rank (LoRA): must be at least 1 (lora.rank = 0)")
           .first).to_be_visible()
    shot.stage("rank-toast")
    page.get_by_role("tab", name="Run", exact=True).click()
    page.locator("#run-start").click()
    expect(status).to_have_value(re.compile(r"^not started: the job has problems"))
    problems = page.get_by_label("Problems", exact=True)
    expect(problems).to_have_value(re.compile(r"Rank \(LoRA\): must be at least 1 \(lora.rank = 0\)"))
    time.sleep(1.5)  # the poll must not bring back the last run's status
    expect(status).to_have_value(re.compile(r"^not started: the job has problems"))
    page.get_by_role("tab", name="Training").click()
    rank.fill("4")
    rank.press("Tab")
    page.get_by_role("tab", name="Run", exact=True).click()
    expect(problems).to_be_hidden()
    expect(status).to_have_value("idle")
    shot(page, "04-refused-then-fixed")
    print(f"run workflow: {shot.summary()}")
