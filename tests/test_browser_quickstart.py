"""A newcomer's first LoRA in a real browser (Debian's chromium, driven by playwright, as tests/test_browser.py):
the Quick start on the demo, images uploaded through the page, Start, the Run tab with a sample, Stop, the run in
the Runs tab with its LoRA downloaded; and a zip whose entry would leave its folder refused with one message.

The quick start's screenshot (docs/quickstart.png in the README) is made here: it is written, palette-reduced, to
the test's screenshot folder (its path is printed).
"""

from __future__ import annotations

import io
import re
import zipfile
from pathlib import Path

import pytest
from test_app import _launch, _shut_down, _wait_until_up
from test_browser import CHROMIUM, CHROMIUM_ARGS, WAIT_MS, Shots, choose, wait_until

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"needs Debian's chromium at {CHROMIUM} "
                                                     "(apt-get install chromium)"),
]
SAMPLE_SHOWN = ("() => Array.from(document.querySelectorAll('#run-samples img'))"
                ".some(img => img.complete && img.naturalWidth > 0)")
README_SHOT_COLOURS = 64  # a palette this small keeps the README's screenshot under 150 KB


def images(folder: Path) -> list[Path]:
    """Four small images, two with captions, as a user would drop them."""
    from PIL import Image

    folder.mkdir()
    paths = []
    for index, colour in enumerate([(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40)]):
        path = folder / f"photo {index}.png"
        Image.new("RGB", (96, 80), colour).save(path)
        paths.append(path)
    for index in range(2):
        (folder / f"photo {index}.txt").write_text(f"a plain square, number {index}", encoding="utf-8")
        paths.append(folder / f"photo {index}.txt")
    return paths


def small_png(source: Path, target: Path) -> None:
    from PIL import Image

    with Image.open(source) as shot:
        shot.convert("RGB").quantize(README_SHOT_COLOURS).save(target, optimize=True)


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory):
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=WAIT_MS)  # a busy machine: the page itself can take more than expect's 5 s to draw
    workdir = tmp_path_factory.mktemp("quickstart")
    process, url, log = _launch(workdir)
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
            try:
                _wait_until_up(url, process, timeout=120)
                page = browser.new_page(viewport={"width": 1200, "height": 900}, accept_downloads=True)
                page.set_default_timeout(WAIT_MS)
                page.goto(url)
                yield page, workdir
            finally:
                browser.close()
    finally:
        _shut_down(process, log)


def test_a_newcomer_trains_a_first_lora_from_the_quick_start(app, tmp_path):
    from playwright.sync_api import expect

    page, workdir = app
    shot = Shots(tmp_path / "screenshots")
    shots = shot.folder
    expect(page.get_by_role("tab", name="Quick start", selected=True)).to_be_visible()  # the first thing shown
    choose(page, "GPU", "CPU only (no NVIDIA GPU)")  # as on this machine; a GPU machine preselects its own
    expect(page.locator("#quick-model")).to_contain_text("Real FLUX models need an NVIDIA GPU")

    shot.stage("chosen")
    page.locator("#quick-upload input[type=file]").set_input_files([str(p) for p in images(tmp_path / "mine")])
    expect(page.locator("#quick-upload-message")).to_contain_text("6 files written to", timeout=WAIT_MS)
    expect(page.locator("#quick-upload-thumbnails img")).to_have_count(4)
    dataset = workdir / "datasets" / "my_dataset"
    assert sorted(p.name for p in dataset.iterdir()) == [
        "photo_0.png", "photo_0.txt", "photo_1.png", "photo_1.txt", "photo_2.png", "photo_3.png"]
    expect(page.get_by_label("Image folder").first).to_have_value(str(dataset))
    shot.stage("uploaded")
    page.get_by_label("Trigger word").first.fill("ohwx")
    page.get_by_label("LoRA name").fill("first_lora")
    page.get_by_label("LoRA name").press("Tab")
    expect(page.locator("#quick-verdict")).to_contain_text("fits — no NVIDIA GPU")
    page.evaluate("window.scrollTo(0, 0)")
    shot(page, "quickstart-full")
    small_png(shots / "quickstart-full.png", shots / "quickstart.png")

    page.locator("#quick-start").click()
    expect(page.get_by_role("tab", name="Run", exact=True, selected=True)).to_be_visible(timeout=WAIT_MS)
    shot.stage("run-tab")
    wait_until(page, "a sample image has loaded", SAMPLE_SHOWN, shots)
    shot.stage("sample")
    page.get_by_role("button", name="Stop", exact=True).click()
    expect(page.get_by_label("Status", exact=True)).to_have_value(re.compile(r"^stopped: LoRA saved to "),
                                                                  timeout=WAIT_MS)
    shot.stage("stopped")
    page.get_by_role("tab", name="Dataset & Captioning").click()  # the quick start filled the form
    expect(page.get_by_label("Image folder").filter(visible=True)).to_have_value(str(dataset))
    page.get_by_role("button", name="Caption editor ▼").click()  # the uploaded images, with their captions
    page.get_by_role("button", name="Load captions").click()
    expect(page.get_by_label("Editor", exact=True)).to_have_value(f"4 images in {dataset}", timeout=WAIT_MS)
    expect(page.get_by_label("photo_0.png", exact=True)).to_have_value("a plain square, number 0")
    shot.stage("captions")
    page.get_by_role("tab", name="Model").click()
    expect(page.get_by_role("combobox", name="Hardware profile")).to_have_value("CPU only (no NVIDIA GPU)")

    page.get_by_role("tab", name="Runs").click()
    row = page.locator("#runs-table").get_by_test_id("cell-0-0")  # the newest run is the first row
    expect(row).to_have_text("first_lora", timeout=WAIT_MS)
    expect(page.locator("#runs-table")).to_contain_text("stopped")
    shot.stage("runs-row")
    row.click()
    expect(page.locator("#runs-details")).to_contain_text("first_lora — stopped", timeout=WAIT_MS)
    expect(page.locator("#runs-samples img").first).to_be_visible(timeout=WAIT_MS)
    shot.stage("details")
    with page.expect_download() as download:
        page.locator("#runs-loras a[download='first_lora.safetensors']").click()
    saved = tmp_path / "downloaded.safetensors"
    download.value.save_as(saved)
    assert saved.read_bytes() == (workdir / "output" / "first_lora" / "first_lora.safetensors").read_bytes()
    shot(page, "runs")

    page.once("dialog", lambda dialog: dialog.dismiss())  # Delete asks first; declined, nothing moves
    page.get_by_role("button", name="Delete").click()
    # the declined Delete's event leaves gradio's queue first (the app queues a click made while it waits, too)
    expect(page.locator("#runs-table")).not_to_contain_text("queue:", timeout=WAIT_MS)
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete").click()
    expect(page.locator("#runs-table")).not_to_contain_text("first_lora", timeout=WAIT_MS)
    assert not (workdir / "output" / "first_lora").exists()
    assert [p.name.split("-")[0] for p in (workdir / "trash").iterdir()] == ["first_lora"]
    print(f"quick start: {shot.summary()}")


def test_a_zip_whose_entry_leaves_its_folder_is_refused(app, tmp_path):
    from playwright.sync_api import expect

    page, workdir = app
    buffer = io.BytesIO()
    from PIL import Image

    Image.new("RGB", (64, 64), (9, 9, 9)).save(buffer, format="PNG")
    archive = tmp_path / "escape.zip"
    with zipfile.ZipFile(archive, "w") as handle:
        handle.writestr("../../escaped.png", buffer.getvalue())
    page.get_by_role("tab", name="Quick start").click()
    page.locator("#quick-upload input[type=file]").set_input_files(str(archive))
    message = page.locator("#quick-upload-message")
    expect(message).to_contain_text("escape.zip: ../../escaped.png: a path that leads out of its folder (..) is not "
                                    "allowed in a zip; refused", timeout=WAIT_MS)
    assert not list(workdir.parent.rglob("escaped.png"))
