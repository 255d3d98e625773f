"""The web page, driven in a real headless browser (Debian's chromium through Playwright)."""

import io
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from media_trees import tone
from playwright.sync_api import sync_playwright

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def app_url(trained_workdir, tmp_path_factory):
    port = free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "clipsep_jax.app", f"--workdir={trained_workdir}",
             "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 240
    while True:
        try:
            urllib.request.urlopen(url, timeout=5)
            break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail(f"the app did not start:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    yield url
    process.terminate()
    process.wait(timeout=30)


def fetch_wave(page, component):
    href = page.locator(f"{component} a[download]").first.get_attribute("href")
    body = page.request.get(href).body()
    return sf.read(io.BytesIO(body))


def separate_in_page(page, url, recording, queries):
    page.goto(url)
    page.wait_for_selector("#separate")
    page.locator("#mixture input[type=file]").set_input_files(str(recording))
    page.locator("#queries textarea").fill("\n".join(queries))
    page.wait_for_timeout(1500)  # the upload lands
    page.locator("#separate").click()


def test_the_page_separates_and_survives_a_bad_file(app_url, tmp_path):
    assert os.path.exists(CHROMIUM), f"{CHROMIUM} missing: apt-get install chromium"
    recording = tmp_path / "mixture.wav"
    sf.write(recording, (tone(4.0, 16000, 220, seed=1) + tone(4.0, 16000, 70, seed=2)) / 2,
             16000)
    bad = tmp_path / "broken.wav"
    bad.write_text("this is not audio")
    artefacts = Path(os.environ.get("CLIPSEP_TEST_ARTIFACTS", tmp_path))
    artefacts.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        separate_in_page(page, app_url, recording, ["accordion", "tuba"])
        page.wait_for_selector("#status:has-text('Separated 4.0 s')", timeout=120_000)
        for component, label in (("#output_0", "accordion"), ("#output_1", "tuba"),
                                 ("#residual", None)):
            assert page.locator(component).is_visible()
            if label:
                assert page.locator(component).get_by_text(label).count() >= 1
            wave, rate = fetch_wave(page, component)
            assert rate == 16000 and len(wave) == 64000
            assert np.sqrt(np.mean(wave**2)) > 1e-3, component  # not silent
        assert not page.locator("#output_2").is_visible()
        assert page.locator("#pictures img").count() == 3  # the mixture and two masks
        page.wait_for_timeout(3000)  # waveforms and pictures drawn
        page.screenshot(path=str(artefacts / "app.png"), full_page=True)

        separate_in_page(page, app_url, bad, ["accordion"])
        page.wait_for_selector("text=broken.wav: cannot read audio", timeout=60_000)

        separate_in_page(page, app_url, recording, ["tuba"])  # the server still serves
        page.wait_for_selector("#status:has-text('into 1 source')", timeout=60_000)
        browser.close()
    assert (artefacts / "app.png").stat().st_size > 10_000
