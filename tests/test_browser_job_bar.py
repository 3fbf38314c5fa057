"""The job bar and an idle Run tab in chromium, on the prebuilt demo's job (its own app: the Run tab's workflow is
tests/test_browser_session.py, which can run on another worker): a CPU-only machine preselects the CPU profile; a
job loaded over another raises no error toasts; the saved job does not push the tabs down and toasts do not cover
the job buttons; the loaded job fills the form; the Run tab's buttons that cannot act are disabled with the reason
on hover.

Screenshots go to a folder under the test's tmp dir (its path is printed).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_browser import CHROMIUM, Shots
from test_browser_session import BUTTONS, load_job, studio_in_chromium

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM} "
                                                     "(apt-get install chromium)"),
]

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
# The job bar's buttons a visible toast covers ([] when none does); null while no toast shows.
TOAST_COVERS = """() => { const toast = document.querySelector('.toast-body'); if (!toast) return null;
    const t = toast.getBoundingClientRect();
    return Array.from(document.querySelectorAll('button')).filter(b => /^(Save job|Load job|Upload job)/.test(
        b.innerText.trim())).filter(b => { const r = b.getBoundingClientRect();
        return !(r.right <= t.left || t.right <= r.left || r.bottom <= t.top || t.bottom <= r.top); })
        .map(b => b.innerText.trim()); }"""


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory, demo_dir: Path) -> Iterator[object]:
    workdir = tmp_path_factory.mktemp("job-bar")
    with studio_in_chromium(workdir, demo_dir) as (_, page, _):
        (workdir / "jobs" / "klein.toml").write_text(KLEIN_JOB.format(dataset=demo_dir / "dataset"),
                                                    encoding="utf-8")
        yield page


def test_the_job_bar_and_an_idle_run_tab_in_chromium(studio, tmp_path: Path):
    from playwright.sync_api import expect

    page = studio
    shot = Shots(tmp_path / "screenshots")
    page.get_by_role("tab", name="Model").click()
    # A CPU-only machine (this one): the CPU profile, its label saying "no GPU" once.
    expect(page.get_by_role("combobox", name="Hardware profile")).to_have_value("CPU only (no NVIDIA GPU)")

    # Saving does not push the tabs down; a job loaded over another raises no error toasts.
    shot.stage("profile")
    load_job(page, "klein.toml")
    load_job(page, "demo.toml")
    shot.stage("loaded")
    tabs_y = page.get_by_role("tab", name="Model").bounding_box()["y"]  # under a one-line notice
    path = page.locator("#job-path textarea, #job-path input").first
    path.fill("jobs/saved.toml")
    page.get_by_role("button", name="Save job", exact=True).click()
    expect(page.locator("#job-notice")).to_contain_text("saved")
    expect(page.locator("#job-download")).to_be_visible()
    shot.stage("saved")
    time.sleep(1)  # a stale change event would answer within this
    assert page.locator(".toast-body.error").count() == 0, page.locator(".toast-body").all_inner_texts()
    assert page.get_by_role("tab", name="Model").bounding_box()["y"] == tabs_y
    # A toast (Load job without a path warns) does not cover the job buttons.
    path.fill("")
    page.get_by_role("button", name="Load job", exact=True).click()
    page.wait_for_function(TOAST_COVERS)  # both measured at once: a toast goes after 10 s
    assert page.evaluate(TOAST_COVERS) == [], "a toast covers the job buttons"
    shot(page, "01-jobs")

    page.get_by_role("tab", name="Training").click()
    expect(page.get_by_label("Run length (steps)", exact=True)).to_have_value("6")
    shot.stage("training-tab")
    page.get_by_role("tab", name="Run", exact=True).click()
    page.wait_for_function("() => document.getElementById('run-stop')?.title")  # after the next poll
    buttons = page.evaluate(BUTTONS)
    assert buttons["run-stop"] == [True, "no run in progress"], buttons
    assert buttons["run-end"][0] and buttons["run-end"][1].startswith("no session to end")
    assert not buttons["run-start"][0] and not buttons["run-train"][0]
    print(f"job bar: {shot.summary()}")
