"""Headless Chromium for the browser tests (Debian packages chromium and chromium-driver; .ci/run installs them),
driven by Selenium, with flags that work on a closed network."""
from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import in_ci

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
FLAGS = ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
         # Software WebGL for the app's canvas (Chromium warns that its automatic fallback is going away); the
         # tests open only pages served from 127.0.0.1.
         "--enable-unsafe-swiftshader")


def chromium(window: tuple[int, int] = (1500, 1100)):
    """A started headless Chromium (a fresh profile); skips the test without one, fails under CI."""
    if not (CHROMIUM and CHROMEDRIVER):
        reason = "chromium and chromedriver not found (apt-get install chromium chromium-driver)"
        if in_ci():
            pytest.fail(f"{reason}: CI must run the browser tests")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*FLAGS, f"--window-size={window[0]},{window[1]}",
                 f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    return driver


def wait_for_text(driver, texts: list[str], timeout: float = 60) -> str:
    """Poll the rendered page until every text is visible (single-page apps have no load event to wait on)."""
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        body = driver.find_element("tag name", "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    raise AssertionError(f"page never showed {[t for t in texts if t not in body]}; it shows:\n{body[:2000]}")


def screenshot(driver, name: str) -> Path:
    """Save the window to reports/<name>."""
    path = REPO / "reports" / name
    path.parent.mkdir(exist_ok=True)
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    return path
