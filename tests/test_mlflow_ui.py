"""The MLflow UI in a real browser: `mlflow server` on 127.0.0.1 and headless Chromium (Debian packages chromium
and chromium-driver; .ci/run installs them) driven by Selenium. Screenshots go to reports/mlflow_ui_*.png."""
from __future__ import annotations

import json
import urllib.parse

import mlflow
import pytest

from tests.browser import chromium, screenshot, wait_for_text
from tests.mlflow_server import mlflow_server

pytestmark = pytest.mark.e2e

RUNS = {"lr-0.0002": {"eval/corr/pck_3": 0.0412, "eval/style/colour_error": 121.5},
        "lr-0.001": {"eval/corr/pck_3": 0.0637, "eval/style/colour_error": 97.25}}


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
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
