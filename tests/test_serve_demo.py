"""The demo page (`GET /`) in a real headless browser: Debian's chromium + chromium-driver
through selenium (`.ci/run` installs them where missing). Type a prompt, press Run, wait for
the answer: it equals the API's, and the canvas drew intermediate states of the denoising.
A screenshot is saved as a test artifact (pytest's tmp_path; the path is printed)."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

import httpx
import pytest

from dllm_jax import session
from dllm_jax.serve.app import with_chat_template
from tests.serve_helpers import serving

CHROMIUM = "/usr/bin/chromium"


def _chromedriver() -> str:
    for path in ("/usr/bin/chromedriver", shutil.which("chromedriver") or ""):
        if path and Path(path).exists():
            return path
    return ""


@pytest.fixture(scope="module")
def browser():
    driver_path = _chromedriver()
    if not Path(CHROMIUM).exists() or not driver_path:
        pytest.fail("the demo-page test needs Debian's chromium and chromium-driver "
                    f"({CHROMIUM}, /usr/bin/chromedriver); install them with `apt-get install "
                    "-y chromium chromium-driver` (.ci/run does this where they are missing).")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="dllm-demo-chromium-")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={profile}", "--window-size=1100,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def test_demo_page_draws_the_denoising(browser, tmp_path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    sess = with_chat_template(session.load())
    prompt = "reverse: Quinn Uma Carol"
    with serving(sess, max_batch=2) as (base, _app):
        r = httpx.get(base + "/")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        assert "<script" in r.text                              # no CDN, nothing external:
        assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", r.text)
        api = httpx.post(f"{base}/v1/completions", timeout=120, json={
            "prompt": prompt, "block_length": 8, "controller": "threshold",
            "threshold": 0.9}).json()["choices"][0]["text"]
        browser.get(base + "/")
        WebDriverWait(browser, 30).until(
            lambda d: d.find_element(By.ID, "model").text == "tasks-llada-4.6m")
        box = browser.find_element(By.ID, "prompt")
        box.clear()
        box.send_keys(prompt)
        Select(browser.find_element(By.ID, "controller")).select_by_visible_text("threshold")
        browser.find_element(By.ID, "threshold").send_keys("0.9")
        block = browser.find_element(By.ID, "block_length")
        block.clear()
        block.send_keys("8")
        browser.find_element(By.ID, "run").click()
        answer = browser.find_element(By.ID, "answer")
        WebDriverWait(browser, 90).until(
            lambda d: answer.get_attribute("data-state") in ("done", "error"))
        shot = tmp_path / "serve_demo.png"
        browser.save_screenshot(str(shot))
        print(f"screenshot: {shot}")
        assert answer.get_attribute("data-state") == "done", browser.find_element(
            By.ID, "error").text
        canvas = browser.find_element(By.ID, "canvas")
        frames = int(canvas.get_attribute("data-frames"))
        partial = int(canvas.get_attribute("data-partial-frames"))
        cells = canvas.find_elements(By.CLASS_NAME, "cell")
        stats = browser.find_element(By.ID, "stats").text
    assert answer.text == api == "Carol Uma Quinn"
    assert frames > 1 and partial >= 1, (frames, partial)   # intermediate states were drawn
    assert len(cells) == 32 and not [c for c in cells if "masked" in c.get_attribute("class")]
    assert "NFE" in stats and "tokens/s" in stats and "NFE -" not in stats
    assert shot.stat().st_size > 1000
