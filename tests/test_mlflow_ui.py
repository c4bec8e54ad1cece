"""The MLflow UI in a real browser: `mlflow server` on 127.0.0.1 and headless Chromium (Debian packages chromium
and chromium-driver; .ci/run installs them) driven by Selenium. Screenshots go to reports/mlflow_ui_*.png."""
from __future__ import annotations

import json
import os
import shutil
import time
import urllib.parse
from pathlib import Path

import mlflow
import pytest

from tests.mlflow_server import mlflow_server

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
RUNS = {"lr-0.0002": {"eval/corr/pck_3": 0.0412, "eval/style/colour_error": 121.5},
        "lr-0.001": {"eval/corr/pck_3": 0.0637, "eval/style/colour_error": 97.25}}


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        reason = "chromium and chromedriver not found (apt-get install chromium chromium-driver)"
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the browser test")
        pytest.skip(reason)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 "--window-size=1500,1100"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory):
    """Two runs in a fresh store, served by `mlflow server` bound to 127.0.0.1. -> (base URL, experiment id, runs)."""
    work = tmp_path_factory.mktemp("mlflow_ui")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("cocosnet-ui", artifact_location=(work / "artifacts").as_uri())
    runs = {}
    for name, metrics in RUNS.items():
        run = client.create_run(experiment, run_name=name)
        client.log_param(run.info.run_id, "train.lr", name.split("-")[1])
        for key, value in metrics.items():
            client.log_metric(run.info.run_id, key, value)
        client.set_terminated(run.info.run_id)
        runs[name] = run.info.run_id
    with mlflow_server(work, "--backend-store-uri", uri, "--default-artifact-root",
                       (work / "artifacts").as_uri()) as base:
        yield base, experiment, runs


def wait_for_text(driver, texts: list[str], timeout: float = 60) -> str:
    """Poll the rendered page until every text is visible (the UI is a single-page app: no load event to wait on)."""
    deadline = time.monotonic() + timeout
    body = ""
    while time.monotonic() < deadline:
        body = driver.find_element("tag name", "body").text
        if all(t in body for t in texts):
            return body
        time.sleep(0.5)
    raise AssertionError(f"page never showed {[t for t in texts if t not in body]}; it shows:\n{body[:2000]}")


def screenshot(driver, name: str) -> Path:
    path = REPO / "reports" / name
    path.parent.mkdir(exist_ok=True)
    driver.save_screenshot(str(path))
    assert path.stat().st_size > 10_000  # a rendered page, not a blank one
    return path


def test_mlflow_ui_lists_runs_and_compares_their_metrics(browser, ui_server):
    base, experiment, runs = ui_server
    browser.get(f"{base}/#/experiments/{experiment}/runs")
    wait_for_text(browser, list(RUNS))
    screenshot(browser, "mlflow_ui_runs.png")

    query = urllib.parse.urlencode({"runs": json.dumps(list(runs.values())), "experiments": json.dumps([experiment])})
    browser.get(f"{base}/#/compare-runs?{query}")
    body = wait_for_text(browser, [*RUNS, "eval/corr/pck_3", "eval/style/colour_error", "0.0637", "97.25", "train.lr"])
    assert "0.0412" in body and "121.5" in body
    screenshot(browser, "mlflow_ui_compare.png")
