"""A real browser (Debian's chromium, driven by playwright) does what a new user does: open the app, pick a hardware
profile and a preset, Start, watch the progress move and a sample image appear, Stop; then reload to find the form
as it was left, and once more after the remembered form was spoiled, to find a notice. Screenshots of each stage go
to a folder under the test's tmp dir (its path is printed).

Playwright's own browser builds are never downloaded: the test drives /usr/bin/chromium (`apt-get install
chromium`; .ci/run installs it) and is skipped only when that is missing.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from test_app import _launch, _shut_down, _wait_until_up

from trainer.demo import DEMO_RANK, DEMO_STEPS

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--disable-dev-shm-usage"]
WAIT_MS = 120_000  # for the demo to be built and reach its first sample on a slow, busy machine (load 9: 70 s)

# The loss plot draws its lines (vega's line marks get a colour; a plot that once showed an empty frame did not).
LOSS_DRAWN = """() => Array.from(document.querySelectorAll('#run-loss [aria-roledescription="line mark"]'))
    .some(line => line.getAttribute('stroke') && (line.getAttribute('d') || '').length > 10)"""
# The legend names both series inside the plot's frame (at a fixed 300 px height it was cut off below the axis).
LEGEND_SHOWN = """() => { const frame = document.querySelector('#run-loss')?.getBoundingClientRect();
    const labels = Array.from(document.querySelectorAll('#run-loss svg text')).filter(text =>
        ['loss', 'smoothed'].includes(text.textContent) && text.closest('[class*="legend"]'));
    return frame && labels.length === 2
        && labels.every(text => text.getBoundingClientRect().bottom <= frame.bottom); }"""

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM} "
                                                     "(apt-get install chromium)"),
]


class Shots:
    """Screenshots of each stage in a folder (its path printed), and when each was taken."""

    def __init__(self, folder: Path) -> None:
        folder.mkdir()
        print(f"\nscreenshots: {folder}")
        self.folder, self.started, self.stages = folder, time.monotonic(), []

    def __call__(self, page, name: str) -> None:  # noqa: ANN001 - a playwright Page
        page.screenshot(path=self.folder / f"{name}.png", full_page=True)
        self.stage(name)

    def stage(self, name: str) -> None:
        """Note that the test got to `name` now (printed with the screenshots' times)."""
        self.stages.append(f"{name} at {time.monotonic() - self.started:.0f} s")

    def summary(self) -> str:
        return f"{', '.join(self.stages)}; {time.monotonic() - self.started:.0f} s in all"


def choose(page, label: str, option: str | re.Pattern) -> None:  # noqa: ANN001 - a playwright Page
    """Open a gradio dropdown by its label and click one of its options."""
    page.get_by_role("combobox", name=label).click()
    page.get_by_role("option", name=option).click()


def wait_until(page, what: str, script: str, shots: Path) -> None:  # noqa: ANN001
    """Wait for a JS condition; on a timeout, fail naming `what` with the status line and a screenshot."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(script)
    except PlaywrightTimeout:
        page.screenshot(path=shots / "failed.png", full_page=True)
        status = page.get_by_label("Status", exact=True).input_value()
        raise AssertionError(f"timed out waiting until {what}; status {status!r}, progress "
                             f"{page.locator('#run-progress').inner_text()!r} (see {shots / 'failed.png'})") from None


def step_shown(page) -> int:  # noqa: ANN001
    """The step of the progress line under the bar ('step 12/400 · …'); 0 before the first."""
    match = re.search(r"step (\d+)/\d+", page.locator("#run-progress").inner_text())
    return int(match.group(1)) if match else 0


def test_a_new_user_trains_the_demo_in_chromium(tmp_path):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)  # a busy machine: a click's answer can take more than expect's 5 s
    shot = Shots(tmp_path / "screenshots")
    shots = shot.folder
    process, url, log = _launch(tmp_path)
    try:
        with sync_playwright() as playwright:
            # chromium starts while the app does
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.set_default_timeout(WAIT_MS)
                _wait_until_up(url, process, timeout=120)
                page.goto(url)
                expect(page.get_by_role("tab", name="Quick start", selected=True)).to_be_visible()
                shot(page, "01-opened")
                page.get_by_role("tab", name="Model").click()  # the full form, past the quick start

                choose(page, "Hardware profile", "CPU only (no NVIDIA GPU)")
                choose(page, "Preset", re.compile(r"^Demo · "))
                page.get_by_role("button", name="Apply profile and preset").click()
                expect(page.get_by_text("applied profile CPU only (no NVIDIA GPU) and preset Demo").first)\
                    .to_be_visible()
                page.get_by_role("tab", name="Training").click()
                steps = page.get_by_label("Run length (steps)", exact=True).filter(visible=True)
                expect(steps).to_have_value(str(DEMO_STEPS))  # the preset filled the form
                shot(page, "02-profile-and-preset")

                page.get_by_role("tab", name="Run", exact=True).click()
                page.get_by_role("button", name="Start", exact=True).click()
                status = page.get_by_label("Status", exact=True)
                expect(status).to_have_value(re.compile(r"^(started|starting|running)"))
                wait_until(page, "a first step is shown", "() => /step [1-9]\\d*\\//.test("
                           "document.querySelector('#run-progress')?.innerText || '')", shots)
                first = step_shown(page)
                wait_until(page, f"a step after {first} is shown", f"() => {{ const m = /step (\\d+)\\//.exec("
                           f"document.querySelector('#run-progress')?.innerText || ''); return m && Number(m[1]) > "
                           f"{first}; }}", shots)
                assert step_shown(page) > first  # the bar and the line move while it trains
                wait_until(page, "the loss plot draws its lines", LOSS_DRAWN, shots)
                assert page.evaluate(LEGEND_SHOWN), "the loss plot's legend is not shown whole"
                shot(page, "03-training")

                sample = page.locator("#run-samples img").first
                expect(sample).to_be_visible()
                wait_until(page, "a sample image has loaded", "() => Array.from(document.querySelectorAll("
                           "'#run-samples img')).some(img => img.complete && img.naturalWidth > 0)", shots)
                shot(page, "04-sample")

                page.get_by_role("button", name="Stop", exact=True).click()
                expect(status).to_have_value(re.compile(r"^stopped: LoRA saved to "))
                shot(page, "05-stopped")

                # The form survives a reload (as a restart): Start saved it, an edit is saved a second later.
                page.get_by_role("tab", name="Training").click()
                rank = str(2 * DEMO_RANK)  # not the demo's own
                page.get_by_label("Rank", exact=True).fill(rank)
                page.get_by_label("Rank", exact=True).press("Tab")
                remembered = tmp_path / ".studio" / "last_form.toml"
                deadline = time.monotonic() + 10  # the remembered form is written after a quiet second
                while f"rank = {rank}" not in remembered.read_text(encoding="utf-8") and time.monotonic() < deadline:
                    time.sleep(0.2)
                page.reload()
                page.get_by_role("tab", name="Training").click()
                expect(page.get_by_label("Rank", exact=True)).to_have_value(rank)
                expect(steps).to_have_value(str(DEMO_STEPS))
                shot(page, "06-form-restored")

                # A saved form that no longer reads is set aside with a notice; the demo job shows.
                remembered.write_text("[lora\n", encoding="utf-8")
                page.reload()
                expect(page.locator("#job-notice")).to_contain_text("could not be restored")
                page.get_by_role("tab", name="Training").click()
                expect(steps).to_have_value(str(DEMO_STEPS))  # the demo job's own
                shot(page, "07-broken-form-notice")
            finally:
                browser.close()
    finally:
        _shut_down(process, log)
    assert (tmp_path / "output" / "demo_lora" / "demo_lora.safetensors").is_file()
    assert sorted(path.name for path in shots.iterdir()) == [
        "01-opened.png", "02-profile-and-preset.png", "03-training.png", "04-sample.png", "05-stopped.png",
        "06-form-restored.png", "07-broken-form-notice.png"]
    assert (tmp_path / ".studio" / "last_form.toml.broken").read_text(encoding="utf-8") == "[lora\n"
    print(f"browser test: {shot.summary()}")
