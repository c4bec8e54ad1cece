"""Ray Train on one machine: a tracked run against a real `mlflow server`, a worker failure that resumes from
the last checkpoint, and an interrupted run resumed with train.resume_from. All three end with exactly the
weights of the uninterrupted reference run (CPU, one thread per worker: deterministic).

A NaN weight stops a 2-worker run without a retry. One Ray for the module; six trainer fits (about 25 s of Ray
overhead each here), the last one of CoCosNet v1.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import ray
import torch

from pipeline.inference import Translator
from pipeline.model_files import load_model
from pipeline.serving import INPUTS, decode_image, encode_file
from pipeline.tracking import manifest_sha256
from pipeline.train.checkpoint import load_state
from pipeline.train.config import TrainConfig
from pipeline.train.launch import TrainingError, local_ray_options, run_training
from tests.conftest import TRAIN_DATA
from tests.mlflow_server import mlflow_server as running_mlflow_server
from tests.test_train_step import TINY_MODEL, TINY_V1_MODEL

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

STEPS, CHECKPOINT_EVERY, LOG_EVERY, IMAGE_EVERY = 8, 3, 2, 4


def params(tmp: Path, tracking_uri: str, **train) -> dict:
    return {"data": dict(TRAIN_DATA), "model": dict(TINY_MODEL),
            "train": {"steps": STEPS, "batch_size": 2, "real_exemplar_prob": 0.5, "checkpoint_every": CHECKPOINT_EVERY,
                      "log_every": LOG_EVERY, "image_every": IMAGE_EVERY, "keep_checkpoints": 2, "loader_workers": 0,
                      "cpus_per_worker": 1, "storage_path": str(tmp / "checkpoints"), **train},
            "mlflow": {"tracking_uri": tracking_uri, "experiment": "test",
                       "artifact_location": str(tmp / "mlartifacts")}}


def sqlite_uri(tmp: Path) -> str:
    return f"sqlite:///{tmp / 'mlflow.db'}"


def final_state(result) -> dict:
    return load_state(result.checkpoint)


def assert_same_training_state(a: dict, b: dict) -> None:
    assert a["step"] == b["step"] == STEPS
    for key in ("net", "discriminator"):
        assert a[key].keys() == b[key].keys()
        different = [k for k in a[key] if not torch.equal(a[key][k], b[key][k])]
        assert not different, f"{key}: {len(different)} tensors differ, e.g. {different[:3]}"
    for key in ("opt_g", "opt_d"):
        for pid, state in a[key]["state"].items():
            assert all(torch.equal(state[n], b[key]["state"][pid][n]) for n in state), f"{key} state {pid}"


def logged_steps(uri: str, run_id: str, key: str = "g/total") -> list[int]:
    import mlflow

    return [m.step for m in sorted(mlflow.MlflowClient(uri).get_metric_history(run_id, key),
                                   key=lambda m: (m.timestamp, m.step))]


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def local_ray():
    ray.init(**local_ray_options(num_cpus=2, log_to_driver=False))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` process on 127.0.0.1, one worker, started and stopped by this module."""
    folder = tmp_path_factory.mktemp("mlflow_server")
    with running_mlflow_server(folder, "--backend-store-uri", f"sqlite:///{folder / 'server.db'}",
                               "--artifacts-destination", str(folder / "artifacts")) as uri:
        yield uri


@pytest.fixture(scope="module")
def reference(local_ray, mlflow_server, train_shards, tmp_path_factory):
    """The uninterrupted run, tracked in the MLflow server."""
    tmp = tmp_path_factory.mktemp("reference")
    return run_training(params(tmp, mlflow_server, run_name="reference"), shards=train_shards,
                        models_dir=tmp / "models", metrics_path=tmp / "metrics.json",
                        curves_path=tmp / "reports" / "train_losses.csv", base=tmp)


# ---------------------------------------------------------------- tests


def test_one_worker_run_is_fully_tracked_in_a_real_mlflow_server(reference, mlflow_server, train_shards, pairs):
    import mlflow
    import pandas as pd

    result = reference
    losses = {k: v for k, v in result.metrics.items() if k.startswith(("g/", "d/"))}
    assert result.metrics["step"] == STEPS and len(losses) == 12 and all(math.isfinite(v) for v in losses.values())
    checkpoints = sorted(p for p in Path(result.run_dir).glob("checkpoint_*") if p.is_dir())
    assert [p.name for p in checkpoints] == ["checkpoint_00000006", "checkpoint_00000008"]  # keep_checkpoints: 2
    assert all({"state.pt", "meta.json", "rank-0.pt"} <= {f.name for f in p.iterdir()} for p in checkpoints)

    client = mlflow.MlflowClient(mlflow_server)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == str(STEPS) and run.data.params["model.nef"] == "8"
    assert run.data.params["data.image_size"] == "64" and run.data.params["train.vgg_weights"] == "random"
    assert run.data.tags["vgg_weights"] == "random"
    assert run.data.tags["shards.manifest_sha256"] == manifest_sha256(train_shards)
    assert logged_steps(mlflow_server, result.run_id) == [2, 4, 6, 8]
    assert logged_steps(mlflow_server, result.run_id, "samples_per_s") == [2, 4, 6, 8]
    images = [f.path for f in client.list_artifacts(result.run_id, "images")]
    assert any("samples+step+4+" in p and p.endswith(".png") for p in images)
    assert any("samples+step+8+" in p and p.endswith(".png") for p in images)

    # The logged model: a pyfunc from code + config + state dict, registrable and loadable without the repo's pickles.
    # It answers requests of base64 files (pipeline/serving.py) as cocosnet translate would.
    files = [(pairs["maps"] / f"s{k}.png", pairs["photos"] / f"s{k}.jpg", pairs["photo_maps"] / f"s{k}.png")
             for k in range(2)]
    request = pd.DataFrame([dict(zip(INPUTS, map(encode_file, pair))) for pair in files])
    mlflow.set_tracking_uri(mlflow_server)
    try:
        version = mlflow.register_model(result.model_uri, "cocosnet-test")
        client.set_registered_model_alias("cocosnet-test", "champion", version.version)
        predicted = mlflow.pyfunc.load_model("models:/cocosnet-test@champion").predict(request)
        registered = load_model("models:/cocosnet-test@champion")
        from_run = load_model(f"runs:/{result.run_id}/model")
    finally:
        mlflow.set_tracking_uri(None)
    exported = load_model(result.model_dir)
    translator = Translator(exported)
    expected = translator.run([translator.prepare(*pair) for pair in files])  # one batch, as the request
    assert list(predicted.columns) == ["image", "warped"] and len(predicted) == 2
    for field, translation in zip(predicted["image"], expected):
        np.testing.assert_array_equal(np.asarray(decode_image(field)), np.asarray(translation.image))
    for loaded in (registered, from_run):
        assert all(torch.equal(v, exported.state_dict()[k]) for k, v in loaded.state_dict().items())
    trained = final_state(result)["net"]
    assert all(torch.equal(v, trained[k]) for k, v in exported.state_dict().items())
    run_info = json.loads((result.model_dir / "run.json").read_text())
    assert run_info["mlflow_run_id"] == result.run_id and run_info["task"] == "mask"  # inference reads the task
    assert (result.model_dir.parent / "reports" / "train_losses.png").exists()  # curves_path's PNG beside the CSV


def test_a_failed_worker_restarts_from_the_last_checkpoint(reference, train_shards, tmp_path):
    # Rank 0 raises at step 5; FailureConfig(max_failures=1) restarts the group from the checkpoint of step 3.
    result = run_training(params(tmp_path, sqlite_uri(tmp_path), audit={"fail_at_step": 5}, max_failures=1),
                          shards=train_shards, models_dir=None, base=tmp_path)
    assert result.metrics["step"] == STEPS
    # Steps 2 and 4 were logged by the first attempt; the second resumed after step 3 and does not log 4 again.
    assert logged_steps(result.tracking_uri, result.run_id) == [2, 4, 6, 8]
    assert_same_training_state(final_state(result), final_state(reference))


def test_an_interrupted_run_resumed_from_its_checkpoint_matches_the_uninterrupted_run(reference, train_shards,
                                                                                      tmp_path):
    interrupted = params(tmp_path, sqlite_uri(tmp_path), run_name="interrupted", audit={"fail_at_step": 7},
                         max_failures=0)
    with pytest.raises(TrainingError, match=r"(?s)fault drill.*last good checkpoint: .*checkpoint_00000006"):
        run_training(interrupted, shards=train_shards, models_dir=None, base=tmp_path)

    resumed = params(tmp_path, sqlite_uri(tmp_path), run_name="resumed",
                     resume_from=str(tmp_path / "checkpoints" / "interrupted"))
    result = run_training(resumed, shards=train_shards, models_dir=tmp_path / "models", base=tmp_path)
    assert logged_steps(result.tracking_uri, result.run_id) == [8]  # only steps 7 and 8 were trained
    assert_same_training_state(final_state(result), final_state(reference))


def test_a_nan_weight_stops_both_workers_without_a_retry_and_keeps_the_last_good_checkpoint(local_ray, train_shards,
                                                                                           tmp_path):
    # A weight turns NaN before step 5: both ranks stop there and return, so Ray does not retry (max_failures=1 would
    # resume from step 3 and meet the same NaN: MLflow would then hold step 4 twice); nothing is exported.
    poisoned = params(tmp_path, sqlite_uri(tmp_path), run_name="poisoned", workers=2, audit={"nan_at_step": 5},
                      max_failures=1)
    with pytest.raises(TrainingError, match=r"(?s)NaN or Inf values at step 5.*last good checkpoint: "
                                            r".*checkpoint_00000003") as err:
        run_training(poisoned, shards=train_shards, models_dir=tmp_path / "models", base=tmp_path)
    assert isinstance(err.value.__cause__, FloatingPointError)  # Ray's fit returned: no worker raised
    assert not (tmp_path / "models").exists()
    folders = (tmp_path / "checkpoints" / "poisoned").glob("checkpoint_*")
    assert sorted(p.name for p in folders if p.is_dir()) == ["checkpoint_00000003"]
    import mlflow

    client = mlflow.MlflowClient(sqlite_uri(tmp_path))
    run = client.search_runs([client.get_experiment_by_name("test").experiment_id])[0]
    assert run.info.status == "FAILED" and logged_steps(sqlite_uri(tmp_path), run.info.run_id) == [2, 4]
    assert "step 5" in run.data.tags["stopped_by_guard"]  # so train.resume: auto does not continue it into the NaN


def test_a_v1_model_trains_through_the_same_job(local_ray, train_shards, pairs, tmp_path):
    """model.version: 1 runs through the same Ray job, schedule, checkpoints and MLflow logging as v2 (here with the
    image generator at its own rate, train.generator_lr_scale)."""
    import mlflow
    import pandas as pd

    run = params(tmp_path, sqlite_uri(tmp_path), run_name="v1", steps=4, checkpoint_every=2, lr_decay_steps=2,
                 loss={"mask": 100.0}, generator_lr_scale=4.0)
    run["model"] = dict(TINY_V1_MODEL)
    result = run_training(run, shards=train_shards, models_dir=tmp_path / "models", base=tmp_path)
    assert result.metrics["step"] == 4 and result.metrics["g/mask"] > 0
    lr = TrainConfig.from_dict(run["train"]).lr
    correspondence, image_generator = final_state(result)["opt_g"]["param_groups"]
    assert correspondence["lr"] == pytest.approx(lr / 2 / 2)  # TTUR's G rate, halved at the last of 2 decay steps
    assert image_generator["lr"] == pytest.approx(4 * lr / 2 / 2)
    assert logged_steps(result.tracking_uri, result.run_id, "lr/g") == [2, 4]
    assert logged_steps(result.tracking_uri, result.run_id, "lr/image_generator") == [2, 4]
    exported = load_model(result.model_dir)
    assert exported.cfg.version == 1 and exported.cfg.ngf == TINY_V1_MODEL["ngf"]
    client = mlflow.MlflowClient(result.tracking_uri)
    assert client.get_run(result.run_id).data.params["model.version"] == "1"
    # The logged v1 model answers the same REST request as v2's.
    files = (pairs["maps"] / "s0.png", pairs["photos"] / "s0.jpg", pairs["photo_maps"] / "s0.png")
    request = pd.DataFrame([dict(zip(INPUTS, map(encode_file, files)))])
    mlflow.set_tracking_uri(result.tracking_uri)
    try:
        predicted = mlflow.pyfunc.load_model(result.model_uri).predict(request)
    finally:
        mlflow.set_tracking_uri(None)
    translator = Translator(exported)
    expected = translator.run([translator.prepare(*files)])[0]
    np.testing.assert_array_equal(np.asarray(decode_image(predicted["image"][0])), np.asarray(expected.image))
