"""End to end: the inspector app on localhost, driven by headless Chromium (Debian's `chromium`) via Playwright."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from conftest import INSPECTOR_VIEWPORT, ROOT, free_port
from helpers import write_changed_tiny_model, write_config
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"]

if os.environ.get("SDXL_FF_REQUIRE_BROWSER") != "1":  # .ci/run sets it: there a missing browser is a failure
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} not installed (apt-get install chromium chromium-driver)", allow_module_level=True)
    pytest.importorskip("playwright", reason="pip install -r requirements-dev.txt")
from playwright import sync_api  # noqa: E402


def wait_until_serving(url: str, process: subprocess.Popen, log: Path) -> None:
    """Copy the app's output to `log` until gradio says it serves (it prints that once its server is up), then
    keep copying in the background; no polling, no deadline: a slow machine only takes longer."""
    out = open(log, "w")
    for line in process.stdout:
        out.write(line)
        out.flush()
        if "Running on local URL" in line:
            threading.Thread(target=out.writelines, args=(process.stdout,), daemon=True).start()  # the rest
            break
    else:
        out.close()
        raise AssertionError(f"the app exited with {process.wait()} before serving:\n{log.read_text()}")
    with urllib.request.urlopen(url, timeout=60):
        pass


# tools/make_readme_images.py sets these: compare with the quickstart's trained model, keep the screenshot for README
TRAINED_MODEL = os.environ.get("SDXL_FF_INSPECTOR_MODEL")
SCREENSHOT = os.environ.get("SDXL_FF_INSPECTOR_SCREENSHOT")


@pytest.fixture()
def app_url(tmp_path):
    port = free_port()
    log = tmp_path / "app.log"
    trained = TRAINED_MODEL or str(tmp_path / "trained")
    if not TRAINED_MODEL:
        write_changed_tiny_model(tmp_path / "trained")  # compare mode: base vs. a "trained" folder
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "demo_training_flow.py"), "--config", write_config(tmp_path),
         "--samples", "3", "--model", trained, "--host", "127.0.0.1", "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),  # served files stay in tmp_path
             "PYTHONUNBUFFERED": "1"})
    url = f"http://127.0.0.1:{port}/"
    try:
        wait_until_serving(url, process, log)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def image_src(page, elem_id: str) -> str:
    return page.get_attribute(f"#{elem_id} img", "src")


def wait_for_new_src(page, elem_id: str, old: str) -> str:
    page.wait_for_function("([sel, old]) => { const img = document.querySelector(sel); "
                           "return img && img.src && img.src !== old; }", arg=[f"#{elem_id} img", old],
                           timeout=60_000)
    return image_src(page, elem_id)


def png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return float(10 * np.log10(255.0 ** 2 / np.mean((a - b) ** 2)))


def test_browser_picks_a_sample_moves_the_slider_and_images_change(app_url, tmp_path):
    profile = tmp_path / "chromium-profile"  # a fresh profile for every run
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            viewport=INSPECTOR_VIEWPORT)
        try:
            page = browser.new_page()
            page.goto(app_url)
            page.wait_for_selector("#x0_pred img", timeout=60_000)
            fetch = lambda src: page.request.get(src).body()  # noqa: E731
            before = {e: image_src(page, e) for e in ("input", "x_t", "x0_pred", "heatmap", "x0_pred_2")}
            first_bytes = {e: fetch(src) for e, src in before.items()}
            assert all(b.startswith(b"\x89PNG") for b in first_bytes.values())  # lossless, as computed

            page.get_by_label("sample").click()
            page.get_by_role("option", name="1: a white square on a black background").click()
            after_sample = {e: wait_for_new_src(page, e, before[e]) for e in before}
            assert fetch(after_sample["input"]) != first_bytes["input"]
            assert page.get_by_label("token for the attention heatmap").input_value() == "1: a</w>"

            slider = page.locator("#timestep input[type=range]")
            slider.focus()
            page.keyboard.press("End")  # the slider to its last step, t = 999
            assert page.locator("#timestep input[type=number]").input_value() == "999"
            after_slider = {e: wait_for_new_src(page, e, after_sample[e]) for e in ("x_t", "x0_pred", "x0_pred_2")}
            for elem, src in after_slider.items():
                assert fetch(src) != fetch(after_sample[elem]), elem
            assert image_src(page, "input") == after_sample["input"]  # the input does not depend on t
            assert Image.open(io.BytesIO(fetch(after_slider["x_t"]))).size == (128, 128)

            heat = image_src(page, "heatmap")
            page.get_by_label("token for the attention heatmap").click()
            page.get_by_role("option", name="3: square</w>").click()
            assert fetch(wait_for_new_src(page, "heatmap", heat)) != fetch(heat)
            page.wait_for_function("document.querySelector('#loss').innerText.includes('t=999')", timeout=60_000)
            assert "fine-tuned" in page.inner_text("#loss")

            # What the browser shows is recognisable through the trained tiny VAE: at t=0 x_t and x0_pred are
            # the input (ᾱ_0 = 0.99915), at t=999 x0_pred is the UNet's guess from almost pure noise.
            number = page.locator("#timestep input[type=number]")

            def images_at(t: int) -> dict[str, np.ndarray]:  # the images and the loss line come in one update
                number.fill(str(t))
                number.press("Enter")
                page.wait_for_function(f"document.querySelector('#loss').innerText.includes('t={t}:')",
                                       timeout=60_000)
                return {e: png(fetch(image_src(page, e))) for e in ("x_t", "x0_pred", "x0_pred_2")}

            high, low = images_at(999), images_at(0)
            image = png(fetch(image_src(page, "input")))
            for elem in ("x0_pred", "x0_pred_2"):
                assert psnr(low[elem], image) > psnr(high[elem], image) + 3, elem
                assert psnr(low[elem], image) > 16, elem  # the tiny VAE reconstructs shapes at ~22 dB
            assert psnr(low["x_t"], image) > 16
            images_at(400)  # the README's screenshot: a middle step, where x_t is half noise
            page.screenshot(path=str(tmp_path / "inspector.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "inspector.png").stat().st_size > 10_000
    if SCREENSHOT:
        shutil.copyfile(tmp_path / "inspector.png", SCREENSHOT)
    shutil.rmtree(profile, ignore_errors=True)
