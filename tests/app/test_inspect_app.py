"""``potpourri serve --run`` of an inspection run: the JSON endpoint answers as ``inspect predict`` does, refuses
non-images, corrupt and oversized uploads (checked from the header) and keeps serving; 20 concurrent clients get
200 right answers; the page works in headless Chromium (upload, verdict, heat map, CSV)."""

from __future__ import annotations

import base64
import concurrent.futures
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.planted import make_planted

pytest.importorskip("gradio")
pytestmark = pytest.mark.one_thread


def png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def planted_run(tmp_path_factory):
    """PatchCore fitted on planted brick crops (96 px), calibrated on the planted test set, saved as a run."""
    from potpourri.inspect.patchcore import PatchCore, PatchCoreConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    planted = make_planted()
    method = PatchCore(PatchCoreConfig(image_size=96, coreset_ratio=0.25)).fit(planted.train)
    scores, maps = method.score(planted.test)
    method.calibrate(scores, planted.labels, maps, planted.masks)
    folder = tmp_path_factory.mktemp("inspect_run")
    method.save(folder)
    torch.set_num_threads(threads)
    return folder, planted


@pytest.fixture(scope="module")
def client(planted_run):
    from fastapi.testclient import TestClient

    from potpourri.app.inspect_app import InspectionService, build_inspection_app

    service = InspectionService(planted_run[0], max_megapixels=1.0)
    return TestClient(build_inspection_app(service)), service


def test_the_endpoint_answers_as_inspect_predict(client, planted_run):
    from potpourri.inspect.base import load_method

    api, _ = client
    folder, planted = planted_run
    expected = load_method(folder).predict(planted.test)
    for image, result in zip(planted.test, expected, strict=True):
        answer = api.post("/api/inspect", content=png(image)).json()
        assert answer["score"] == pytest.approx(result.score, rel=1e-5)
        assert answer["verdict"] == ("defect" if result.label else "good")
        assert answer["normalised"] == pytest.approx(result.normalised, abs=1e-4)
        heat = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["map_png"]))))
        assert heat.shape == tuple(answer["map_size"]) == (96, 96)
    assert {a for a in planted.labels} == {0, 1}


def test_bad_uploads_get_a_clear_message_and_the_server_keeps_serving(client, planted_run):
    api, _ = client
    _, planted = planted_run
    huge_header = b"P6\n2000 2000\n255\n" + bytes(30)  # 4 megapixels by its header; refused before decoding
    cases = [(b"not an image at all", "not a readable image"), (png(planted.test[0])[:60], "not a readable image"),
             (huge_header, "2000x2000 is 4.0 megapixels, above the limit of 1")]  # fmt: skip
    for data, message in cases:
        answer = api.post("/api/inspect", content=data)
        assert answer.status_code == 422 and message in answer.json()["error"], answer.text
    assert api.post("/api/inspect", content=png(planted.test[0])).status_code == 200


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def server(planted_run):
    """``potpourri serve --run`` in its own process; yields (port, pid)."""
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    process = subprocess.Popen(
        [sys.executable, "-m", "potpourri.cli", "serve", "--run", str(planted_run[0]), "--port", str(port),
         "--threads", "1", "--device", "cpu"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2).close()
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            assert process.poll() is None, process.stdout.read()
            time.sleep(0.5)
    try:
        yield port, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.mark.slow
def test_20_concurrent_clients_200_images_all_right_and_bounded_memory(server, planted_run):
    from potpourri.inspect.base import load_method

    port, pid = server
    folder, planted = planted_run
    expected = [r.score for r in load_method(folder).predict(planted.test)]
    bodies = [png(image) for image in planted.test]

    def ask(index: int) -> tuple[int, float]:
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/inspect", data=bodies[index % len(bodies)],
                                         method="POST")  # fmt: skip
        with urllib.request.urlopen(request, timeout=120) as response:
            return index, json.loads(response.read())["score"]

    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(ask, range(200)))
    assert len(answers) == 200
    for index, score in answers:
        assert score == pytest.approx(expected[index % len(bodies)], rel=1e-5)
    status = Path(f"/proc/{pid}/status").read_text()
    peak_kib = int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1])
    assert peak_kib < 2 * 1024 * 1024, f"server peak RSS {peak_kib / 1024:.0f} MiB"


CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
MISSING = [n for n, ok in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER),
                           ("selenium", importlib.util.find_spec("selenium"))) if not ok]  # fmt: skip


@pytest.mark.slow
def test_the_page_in_headless_chromium(server, planted_run, tmp_path):
    if MISSING:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test; missing {', '.join(MISSING)}")
        pytest.skip(f"browser test needs {', '.join(MISSING)}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    port, _ = server
    _, planted = planted_run
    files = []
    for index in (0, len(planted.test) - 1):  # a good image and a planted defect
        files.append(tmp_path / f"part_{index}.png")
        Image.fromarray(planted.test[index]).save(files[-1])
    (tmp_path / "notes.png").write_bytes(b"plain text, not a picture")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1400",
    ):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        wait = WebDriverWait(browser, 90)
        browser.get(f"http://127.0.0.1:{port}/")
        upload = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#upload input[type=file]"))[0]
        upload.send_keys("\n".join(str(f) for f in [*files, tmp_path / "notes.png"]))
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#upload .file-name, #upload td")) >= 3)
        browser.find_element(By.CSS_SELECTOR, "#inspect").click()
        wait.until(lambda d: "notes.png: not a readable image" in d.find_element(By.ID, "messages").text)
        table = browser.find_element(By.ID, "results").text
        assert "part_0.png" in table and "good" in table and "defect" in table
        assert wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#maps img"))[0].is_displayed()
        link = wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#csv a"))[0]
        with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as response:
            lines = response.read().decode().splitlines()
        assert lines[0].startswith("image,verdict,score") and len(lines) == 3
    finally:
        browser.quit()


def test_plain_language_requests_answer_from_patchcore_masks_and_refuse_kinds(planted_run, tmp_path):
    """The request field of the inspection app: every answer equals the same call run on the method's own pixel
    masks (resized to each image); a call about one defect kind is answered with the KINDLESS sentence."""
    from potpourri.app.inspect_app import InspectionService, answer_files, build_inspection_page
    from potpourri.app.requests import KINDLESS, AnomalyClasses, RequestRunner, run_call
    from potpourri.vlm.router import Call, KeywordRouter

    folder, planted = planted_run
    service = InspectionService(folder)
    runner = RequestRunner(KeywordRouter().route, AnomalyClasses(service.method))
    paths = []
    for i in np.argsort(-np.asarray(planted.labels))[:3]:  # defective images first
        paths.append(tmp_path / f"part{i}.png")
        paths[-1].write_bytes(png(planted.test[i]))
    results = service.method.predict([planted.test[int(p.stem[4:])] for p in paths])
    maps = {}
    for path, image, result in zip(paths, [planted.test[int(p.stem[4:])] for p in paths], results, strict=True):
        resized = Image.fromarray(result.mask.astype(np.uint8)).resize(image.shape[1::-1], Image.Resampling.NEAREST)
        maps[path.name] = np.asarray(resized).astype(np.int64)
    files = [str(p) for p in paths]
    for request, call in (("how many defects are in this part?", Call("count", "any")),
                          ("check these images for defects", Call("find", "any")),
                          ("show me the worst two images with defects", Call("worst", "any", 2))):  # fmt: skip
        routed, text, _ = answer_files(service, runner, files, request)
        expected = run_call(call, maps, ("good", "anomaly"), paths[0].name)
        assert routed == call.text() and text == expected.text
    routed, text, drawn = answer_files(service, runner, files, "outline the defects")
    assert routed == "segment(kind=any)" and maps[paths[0].name].any()
    assert (drawn != planted.test[int(paths[0].stem[4:])]).any(axis=-1).sum() > 0
    routed, text, drawn = answer_files(service, runner, files, "how many scratches are in this part?")
    assert routed == "count(kind=scratch)" and text == KINDLESS.format(kind="scratch") and drawn is None
    ids = lambda page: {c.get("props", {}).get("elem_id") for c in page.config["components"]}  # noqa: E731
    assert "request" not in ids(build_inspection_page(service))
    assert {"request", "call", "request-answer", "request-mask"} <= ids(build_inspection_page(service, runner))
