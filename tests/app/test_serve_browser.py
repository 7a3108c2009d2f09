"""``potpourri serve`` in headless Chromium: upload an image, ask, read the answer and the drawn image off the page.

The expected answer comes from the trained model in this process (its own ``generate`` on the image's features),
not from the app. Skips, with the reason, only when Chromium, chromedriver, gradio or selenium is missing
(``apt-get install chromium chromium-driver``; ``pip install 'potpourri[app]' selenium``). The screenshot is kept in
``runs/test-artifacts/serve_browser.png``.
"""

from __future__ import annotations

import importlib.util
import io
import re
import shutil
import socket
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.app.conftest import BOX_ANSWER, HEIGHT, IMAGE_SIZE, QUESTION, WIDTH

ARTIFACTS = Path(__file__).resolve().parents[2] / "runs" / "test-artifacts"
CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = [name for name, ok in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER),
                                 ("gradio", importlib.util.find_spec("gradio")),
                                 ("selenium", importlib.util.find_spec("selenium"))) if not ok]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1200",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))  # no Selenium Manager download
    yield driver
    driver.quit()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")  # inside gradio's queue, not ours
@pytest.mark.skipif(bool(MISSING), reason=f"browser test needs {', '.join(MISSING)} (not installed)")
def test_upload_ask_and_see_the_answer_and_the_drawn_boxes(tiny_run, patchcore_run, browser, capsys) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from potpourri.app.assistant import Assistant
    from potpourri.app.serve import build_app
    from potpourri.vlm.train import encode_samples

    torch.set_num_threads(1)
    # the expectation: the trained model's own greedy answer for this image (resized to the run's size) + question
    pixels = np.asarray(Image.open(tiny_run.box_image).convert("RGB"))

    class Sample:
        image = np.asarray(Image.fromarray(pixels).resize((IMAGE_SIZE,) * 2, Image.Resampling.BICUBIC))

    expected = tiny_run.vlm.generate(encode_samples(tiny_run.vlm, [Sample()]), [QUESTION], max_new_tokens=64)[0]
    assert expected == BOX_ANSWER  # so the page must also show a drawn box

    inspect_folder, patchcore = patchcore_run
    expected_score = patchcore.predict([pixels])[0].score
    app = build_app(Assistant(tiny_run.path, inspect=inspect_folder))
    port = _free_port()
    app.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)  # a server thread
    try:
        wait = WebDriverWait(browser, 60)
        browser.get(f"http://127.0.0.1:{port}/")
        upload = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))[0]
        upload.send_keys(str(tiny_run.box_image))
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload img"))  # the upload finished
        browser.find_element(By.CSS_SELECTOR, "#question textarea").send_keys(QUESTION)
        browser.find_element(By.CSS_SELECTOR, "#ask").click()
        answer_box = browser.find_element(By.CSS_SELECTOR, "#answer textarea")
        wait.until(lambda d: answer_box.get_attribute("value"))
        assert answer_box.get_attribute("value") == expected
        drawn = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#annotated img"))[0]
        assert drawn.is_displayed()
        with urllib.request.urlopen(drawn.get_attribute("src"), timeout=30) as response:  # the picture the page shows
            shown = np.asarray(Image.open(io.BytesIO(response.read())).convert("RGB"))
        assert shown.shape == (HEIGHT, WIDTH, 3)
        assert (shown[10:40, 10:12] == (255, 0, 0)).all()  # the left edge of the planted box, x = 10 px
        assert "crack: (10, 10, 60, 40)" in browser.find_element(By.CSS_SELECTOR, "#boxes textarea").get_attribute(
            "value"
        )
        verdict = browser.find_element(By.CSS_SELECTOR, "#verdict textarea").get_attribute("value")
        assert float(re.search(r"patchcore: score (\S+)", verdict).group(1)) == pytest.approx(expected_score, rel=1e-2)
        assert wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#inspection img"))[0].is_displayed()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(ARTIFACTS / "serve_browser.png"))
        with capsys.disabled():
            print(f"\nscreenshot: {ARTIFACTS / 'serve_browser.png'}")
    finally:
        app.close()
