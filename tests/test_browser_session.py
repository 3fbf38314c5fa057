"""One chromium session through the Run tab's workflow and the job bar, on the prebuilt demo (a job file names it,
so nothing is built): a job loaded over another raises no error toasts; the buttons that cannot act are disabled
with the reason on hover; Train N steps, End training ("ended"), then the resume offer on every load and in a
second browser; a Start over the run asks; Continue goes on with the plot and samples from before; a refused
Start is the status line until the form is fixed; the saved job does not push the tabs down and toasts do not
cover the job buttons; the samples show whole labels; a CPU-only machine preselects the CPU profile.

Screenshots of each stage go to a folder under the test's tmp dir (its path is printed).
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from test_app import _launch, _shut_down, _wait_until_up
from test_browser import CHROMIUM, CHROMIUM_ARGS

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM} "
                                                     "(apt-get install chromium)"),
]
WAIT_MS = 90_000
RUN_MS = 300_000  # a step of the demo's run: the trainer process loads torch first (minutes on a busy machine)

KLEIN_JOB = """[model]
family = "flux2"
flavour = "klein-base-9b"
source = ""
[[data.datasets]]
path = "{dataset}"
[lowvram]
strategy = "conservative"
blocks_to_swap = 25
[output]
dir = "out-klein"
"""
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


# The job bar's buttons a visible toast covers ([] when none does); null while no toast shows.
TOAST_COVERS = """() => { const toast = document.querySelector('.toast-body'); if (!toast) return null;
    const t = toast.getBoundingClientRect();
    return Array.from(document.querySelectorAll('button')).filter(b => /^(Save job|Load job|Upload job)/.test(
        b.innerText.trim())).filter(b => { const r = b.getBoundingClientRect();
        return !(r.right <= t.left || t.right <= r.left || r.bottom <= t.top || t.bottom <= r.top); })
        .map(b => b.innerText.trim()); }"""


def test_the_run_workflow_and_the_job_bar_in_chromium(tmp_path: Path, demo_dir: Path):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)  # a busy machine: the trainer process alone takes tens of seconds to load
    shots = tmp_path / "screenshots"
    shots.mkdir()
    print(f"\nscreenshots: {shots}")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "klein.toml").write_text(KLEIN_JOB.format(dataset=demo_dir / "dataset"), encoding="utf-8")
    (tmp_path / "jobs" / "demo.toml").write_text(DEMO_JOB.format(demo=demo_dir), encoding="utf-8")
    out = tmp_path / "jobs" / "output" / "run"  # the job's relative output.dir, from the job file's folder
    # CPU processes offered: the "Several GPUs" section shows, and its Start asks as Start does
    process, url, log = _launch(tmp_path, "--allow", str(demo_dir), env={"FLUX_STUDIO_CPU_PROCESSES": "1"})
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(WAIT_MS)
                _wait_until_up(url, process, timeout=120)
                page.goto(url)
                page.get_by_role("tab", name="Model").click()
                # A CPU-only machine (this one): the CPU profile, its label saying "no GPU" once.
                expect(page.get_by_role("combobox", name="Hardware profile")).to_have_value(
                    "CPU only (no NVIDIA GPU)")

                # Saving does not push the tabs down; a job loaded over another raises no error toasts.
                path = page.locator("#job-path textarea, #job-path input").first
                path.fill("jobs/klein.toml")
                page.get_by_role("button", name="Load job", exact=True).click()
                expect(page.locator("#job-notice")).to_contain_text("loaded klein.toml")
                path.fill("jobs/demo.toml")
                page.get_by_role("button", name="Load job", exact=True).click()
                expect(page.locator("#job-notice")).to_contain_text("loaded demo.toml")
                tabs_y = page.get_by_role("tab", name="Model").bounding_box()["y"]  # under a one-line notice
                path.fill("jobs/saved.toml")
                page.get_by_role("button", name="Save job", exact=True).click()
                expect(page.locator("#job-notice")).to_contain_text("saved")
                expect(page.locator("#job-download")).to_be_visible()
                time.sleep(1)  # a stale change event would answer within this
                assert page.locator(".toast-body.error").count() == 0, page.locator(".toast-body").all_inner_texts()
                assert page.get_by_role("tab", name="Model").bounding_box()["y"] == tabs_y
                # A toast (Load job without a path warns) does not cover the job buttons.
                path.fill("")
                page.get_by_role("button", name="Load job", exact=True).click()
                page.wait_for_function(TOAST_COVERS)  # both measured at once: a toast goes after 10 s
                assert page.evaluate(TOAST_COVERS) == [], "a toast covers the job buttons"
                page.screenshot(path=shots / "01-jobs.png", full_page=True)

                page.get_by_role("tab", name="Training").click()
                expect(page.get_by_label("Run length (steps)", exact=True)).to_have_value("6")
                page.get_by_role("tab", name="Run", exact=True).click()
                page.wait_for_function("() => document.getElementById('run-stop')?.title")  # after the next poll
                buttons = page.evaluate(BUTTONS)
                assert buttons["run-stop"] == [True, "no run in progress"], buttons
                assert buttons["run-end"][0] and buttons["run-end"][1].startswith("no session to end")
                assert not buttons["run-start"][0] and not buttons["run-train"][0]

                status = page.get_by_label("Status", exact=True)
                steps = page.get_by_label("Steps to train now", exact=True)
                steps.fill("3")
                steps.press("Tab")
                page.locator("#run-train").click()
                expect(status).to_have_value(re.compile(r"^paused at step 3 "), timeout=RUN_MS)
                expect(page.locator("#run-start")).to_be_disabled()
                assert page.evaluate(BUTTONS)["run-start"][1].startswith("a session is paused at step 3")
                page.locator("#run-end").click()
                expect(status).to_have_value(re.compile(r"^ended: LoRA saved to "), timeout=RUN_MS)
                offer = page.locator("#resume-offer")
                expect(offer).to_be_visible()
                expect(page.locator("#run-resume")).to_have_text("Continue at step 3")
                page.screenshot(path=shots / "02-ended.png", full_page=True)

                for _ in range(3):  # the offer on every load (it showed on about half of them)
                    page.reload()
                    page.get_by_role("tab", name="Run", exact=True).click()
                    expect(offer).to_be_visible()
                expect(steps).to_have_value("3")  # N survives a reload
                other = browser.new_page(viewport={"width": 1400, "height": 1000})
                other.goto(url)
                other.get_by_role("tab", name="Run", exact=True).click()
                expect(other.locator("#resume-offer")).to_be_visible()
                other.close()

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
                page.locator("#run-resume").click()
                expect(status).to_have_value(re.compile(r"^completed: LoRA saved to "), timeout=RUN_MS)
                assert not (out / "earlier_runs").exists()
                expect(offer).to_be_hidden()
                expect(ask).to_be_hidden()
                # the samples of steps 0 and 2 from before the resume, then 4 and 6: every one shown (the gallery
                # grows), each label whole and under its picture
                page.wait_for_function("() => document.querySelectorAll('#run-samples img').length >= 4")
                assert page.evaluate(TRUNCATED_CAPTIONS) == 0, "a sample's label is cut off"
                shown, bad, scrolls = page.evaluate(GALLERY)
                assert shown >= 4 and bad == 0 and not scrolls, (shown, bad, scrolls)
                memory = page.locator("#run-memory").inner_text()  # the machine's RAM apart from the trainer's
                assert "machine RAM (all programs)" in memory and "trainer RAM" not in memory, memory
                page.screenshot(path=shots / "03-resumed.png", full_page=True)

                # A refused Start is the status line; the problems go once the form is fixed.
                page.get_by_role("tab", name="Training").click()
                rank = page.get_by_label("Rank", exact=True)
                rank.fill("0")
                rank.press("Tab")
                # checked as typed, in the page's words
                expect(page.locator(".toast-body").filter(has_text="Rank (LoRA): must be at least 1 (lora.rank = 0)")
                       .first).to_be_visible()
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
                page.screenshot(path=shots / "04-refused-then-fixed.png", full_page=True)
            finally:
                browser.close()
    finally:
        _shut_down(process, log)
    assert "Traceback" not in (tmp_path / "app.log").read_text(), (tmp_path / "app.log").read_text()[-3000:]
