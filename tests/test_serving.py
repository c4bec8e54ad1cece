"""The registered model over REST (pipeline/serving.py): the logged pyfunc in process, and `mlflow models serve`
of models:/<name>@champion answering a request of base64 files and refusing malformed ones with HTTP 400."""
from __future__ import annotations

import base64
import json
import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.exceptions import MlflowException

from model import CoCosNet
from pipeline import serving
from pipeline.inference import Translator, load
from pipeline.serving import INPUTS, RequestError, decode_image, encode_file, field_bytes
from pipeline.tracking import log_model
from tests.mlflow_server import free_port, running_server
from tests.tiny_translation import tiny_config

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def pair_files(pairs: dict[str, Path], k: int) -> tuple[Path, Path, Path]:
    return pairs["maps"] / f"s{k}.png", pairs["photos"] / f"s{k}.jpg", pairs["photo_maps"] / f"s{k}.png"


def record(files: tuple[Path, ...]) -> dict[str, str]:
    return dict(zip(INPUTS, map(encode_file, files)))


@pytest.fixture(scope="module")
def registry(model_dir, tmp_path_factory):
    """The tiny trained model logged as the pipeline logs it, registered as cocosnet-serve@champion in a sqlite
    store. -> (tracking URI, model URI)."""
    work = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    translator = load(model_dir)
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("serve", artifact_location=(work / "artifacts").as_uri())
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment):
            model_uri = log_model(translator.net.state_dict(), translator.cfg)
        version = mlflow.register_model(model_uri, "cocosnet-serve")
        client.set_registered_model_alias("cocosnet-serve", "champion", version.version)
    finally:
        mlflow.set_tracking_uri(None)
    return uri, "models:/cocosnet-serve@champion"


def test_request_fields_are_base64_files():
    assert field_bytes(None, "f") is None and field_bytes(float("nan"), "f") is None  # absent optional field
    assert field_bytes("data:image/png;base64," + base64.b64encode(b"\x89PNG").decode(), "f") == b"\x89PNG"
    with pytest.raises(RequestError, match="record 0 exemplar: not valid base64"):
        field_bytes("%%%", "record 0 exemplar")
    with pytest.raises(RequestError, match="expected a base64-encoded file .string., got list"):
        field_bytes([1, 2], "x")
    with pytest.raises(RequestError, match="empty file"):
        field_bytes("", "x")


def test_the_signature_requires_an_exemplar_map_except_for_edge_models():
    required = {c.name: c.required for c in serving.signature(tiny_config()).inputs.inputs}
    assert required == {"input_map": True, "exemplar": True, "exemplar_map": True}
    edge = {c.name: c.required for c in serving.signature(tiny_config(label_nc=1)).inputs.inputs}
    assert edge["exemplar_map"] is False


def test_the_logged_model_translates_records_of_base64_files(registry, model_dir, pairs):
    uri, model_uri = registry
    mlflow.set_tracking_uri(uri)
    try:
        pyfunc = mlflow.pyfunc.load_model(model_uri)
    finally:
        mlflow.set_tracking_uri(None)
    files = [pair_files(pairs, k) for k in range(2)]
    predicted = pyfunc.predict(pd.DataFrame([record(f) for f in files]))
    translator = load(model_dir)
    expected = translator.run([translator.prepare(*f) for f in files])
    assert list(predicted.columns) == ["image", "warped"]
    for k, result in enumerate(expected):
        np.testing.assert_array_equal(np.asarray(decode_image(predicted["image"][k])), np.asarray(result.image))
        np.testing.assert_array_equal(np.asarray(decode_image(predicted["warped"][k])), np.asarray(result.warped[-1]))

    bad = [record(f) for f in files]
    bad[1]["input_map"] = encode_file(files[0][1])  # a colour photo where class ids belong
    with pytest.raises(MlflowException, match="record 1 input_map: label map must be single-channel class ids"):
        pyfunc.predict(pd.DataFrame(bad))
    bad[1]["input_map"] = serving.encode_npy(np.zeros((3, 8, 8), np.uint8))  # channels of another model
    with pytest.raises(MlflowException, match="record 1 input_map: map has 3 channels, the model takes 12"):
        pyfunc.predict(pd.DataFrame(bad))


def test_an_edge_model_computes_the_exemplar_map_when_it_is_left_out(pairs):
    net = CoCosNet(tiny_config(label_nc=1)).eval()
    grey = np.zeros((40, 40), np.uint8)
    grey[10:30, 20] = 255
    edges = {"input_map": serving.encode_png(grey), "exemplar": encode_file(pairs["photos"] / "s0.jpg")}
    out = serving.translate_request(Translator(net), pd.DataFrame([edges]))
    assert decode_image(out["image"][0]).size == (64, 64)


def post(url: str, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.e2e
def test_mlflow_models_serve_answers_a_request_and_refuses_malformed_ones(registry, model_dir, pairs, tmp_path):
    uri, model_uri = registry
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port)]
    # mlflow starts `uvicorn` by name: the environment's bin folder must be on PATH (as in an activated venv).
    env = {"MLFLOW_TRACKING_URI": uri, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    base = f"http://127.0.0.1:{port}"
    files = pair_files(pairs, 0)
    with running_server(command, f"{base}/ping", tmp_path / "serve.log", env, timeout=180):
        status, answer = post(f"{base}/invocations", json.dumps({"dataframe_records": [record(files)]}).encode())
        assert status == 200, answer
        image = np.asarray(decode_image(answer["predictions"][0]["image"]), np.int16)
        expected = np.asarray(load(model_dir).translate(*files), np.int16)
        assert image.shape == (64, 64, 3)
        assert np.abs(image - expected).max() <= 2  # another process: other thread counts may round differently

        status, answer = post(f"{base}/invocations", json.dumps(
            {"dataframe_records": [{"input_map": record(files)["input_map"]}]}).encode())
        assert status == 400 and "missing inputs ['exemplar', 'exemplar_map']" in answer["message"]

        not_a_photo = {**record(files), "exemplar": base64.b64encode(b"plain text").decode()}
        status, answer = post(f"{base}/invocations", json.dumps({"dataframe_records": [not_a_photo]}).encode())
        assert status == 400 and "record 0 exemplar: corrupt or truncated image" in answer["message"]

        status, answer = post(f"{base}/invocations", b"{not json")
        assert status == 400 and answer["error_code"] in ("BAD_REQUEST", "MALFORMED_REQUEST")
