"""Evaluation (pipeline/evaluate.py) and the registry decision (pipeline/registry.py)."""
from __future__ import annotations

import json
import warnings

import mlflow
import pytest
import torch
import torch.nn as nn

from model import CoCosNet, CoCosNetOutput
from pipeline import metrics as M
from pipeline.evaluate import EvalConfig, evaluate_model, run_evaluation
from pipeline.registry import CHALLENGER, CHAMPION, RegisterConfig, register_model
from pipeline.tracking import flatten
from pipeline.model_files import RUN_FILE, write_model_files
from tests.tiny_translation import tiny_config


class CopyExemplar(nn.Module):
    """A stand-in model: matches every pixel to itself and outputs the exemplar unchanged."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_map, exemplar, exemplar_map):
        matches = M.identity_positions(tuple(exemplar.shape[-2:]), exemplar.shape[0])
        return CoCosNetOutput(exemplar, [exemplar], [matches], None, [], None)


@pytest.fixture(scope="module")
def tiny_net() -> CoCosNet:
    torch.manual_seed(0)
    return CoCosNet(tiny_config()).eval()


def test_metrics_of_a_known_model_equal_their_definitions(train_shards, one_torch_thread):
    """Identity matches score exactly the identity baseline; the copied exemplar's colour error and PSNR are
    those of the real exemplar against the ideal render and of the pseudo exemplar against x_B."""
    cfg = EvalConfig(batch_size=4, compare_untrained=False, swd=False)
    result = evaluate_model(CopyExemplar(tiny_config()), str(train_shards), cfg, progress=False)
    m = result.metrics
    assert result.samples == m["samples"] == 6
    assert m["corr"]["pck_3"] == pytest.approx(m["identity"]["pck_3"])
    assert m["corr"]["epe"] == pytest.approx(m["identity"]["epe"])
    assert m["corr_identifiable"]["pck_3"] == pytest.approx(m["identity_identifiable"]["pck_3"])
    assert 0 < m["corr_identifiable"]["fraction"] < 1
    assert 0 < m["identity"]["pck_1"] <= m["identity"]["pck_3"] <= m["identity"]["pck_5"] < 1
    assert result.curves["trained"] == pytest.approx(result.curves["identity"])
    assert m["style"]["colour_error"] > 10  # another image's colours, not the exemplar's palette on A's layout
    assert m["style"]["colour_error_warped"] == pytest.approx(m["style"]["colour_error"])  # its warp is its output
    assert 0 < m["style"]["class_match"] < 1  # identity reads another scene's layout: only the overlap matches
    assert 5 < m["recon"]["psnr"] < 40 and 0 < m["recon"]["ssim"] < 1
    # A copied photo is about as detailed as the target (the pseudo exemplar may be lightly blurred); a blur is not.
    assert 0.5 < m["recon"]["sharpness"] < 1.5 and 0.5 < m["style"]["sharpness"] < 1.5
    assert set(result.skipped) == {"style/vgg_scores", "dist/fid"}
    # Copying the exemplar is the collapse the watch flags: the output equals the exemplar, not the target.
    assert m["collapse"]["to_exemplar"] == 0 and m["collapse"]["to_target"] > 0.02 and m["collapse"]["suspected"] == 1


def test_evaluate_model_reports_every_metric_per_level_and_untrained(train_shards, tiny_net, one_torch_thread):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random VGG weights warn loudly
        cfg = EvalConfig(batch_size=4, vgg_weights="random", fid_features="vgg19", grid_rows=2)
        result = evaluate_model(tiny_net, str(train_shards), cfg, progress=False)
    flat = flatten(result.metrics, "/")
    for prefix in ("", "untrained/"):
        for key in ("corr/epe", "corr/pck_1", "corr/pck_3", "corr/pck_5", "recon/psnr", "recon/ssim", "recon/l1",
                    "recon/sharpness", "style/sharpness", "style/colour_error", "style/colour_error_warped", "style/class_match", "style/psnr_ideal", "style/vgg_colour",
                    "style/vgg_texture", "style/semantic", "dist/swd", "dist/swd_2", "dist/fid",
                    "collapse/to_exemplar", "collapse/to_target", "collapse/suspected", "corr_identifiable/pck_3",
                    "corr_identifiable/epe", "corr_identifiable/fraction"):
            assert prefix + key in flat, prefix + key
    for level in range(4):  # H/8 attention, then PatchMatch at H/4, H/2, H
        assert 0 <= flat[f"corr/levels/l{level}/pck_3"] <= 1
    assert flat["corr/pck_3"] == flat["corr/levels/l3/pck_3"]
    assert result.skipped == {}
    assert result.grid.shape == (2 * 64 + 2, 8 * 64 + 7 * 2, 3)  # input, exemplar, 4 warps, output, ideal


def test_bad_fid_extractor_is_a_clear_error(train_shards, tiny_net, tmp_path):
    bogus = tmp_path / "inception.pt"
    bogus.write_bytes(b"not a torchscript archive")
    with pytest.raises(ValueError, match="inception.pt: not a TorchScript"):
        evaluate_model(tiny_net, str(train_shards), EvalConfig(fid_features=str(bogus)), progress=False)


def test_torchscript_fid_extractor(train_shards, tiny_net, tmp_path, one_torch_thread):
    class Features(nn.Module):  # the reference Inception port's calling convention, 4 features
        def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
            return torch.stack([x.mean((1, 2, 3)), x.std((1, 2, 3)), x[:, 0].mean((1, 2)), x[:, 2].mean((1, 2))], 1)

    path = tmp_path / "features.pt"
    torch.jit.script(Features()).save(str(path))
    cfg = EvalConfig(batch_size=4, fid_features=str(path), compare_untrained=False, swd=False)
    result = evaluate_model(tiny_net, str(train_shards), cfg, progress=False)
    assert result.metrics["dist"]["fid"] > 0


def test_run_evaluation_writes_files_and_logs_to_the_models_run(train_shards, tiny_net, tmp_path, one_torch_thread):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    run_id = client.create_run(client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())).info.run_id
    models = tmp_path / "models"
    write_model_files(models, tiny_net.state_dict(), tiny_net.cfg)
    (models / RUN_FILE).write_text(json.dumps({"mlflow_run_id": run_id}))
    params = {"evaluate": {"batch_size": 4, "max_samples": 4, "grid_rows": 2}, "mlflow": {"tracking_uri": uri}}
    result = run_evaluation(params, model_ref=str(models), shards=str(train_shards),
                            metrics_path=tmp_path / "metrics" / "eval.json", reports_dir=tmp_path / "reports",
                            progress=False)
    assert result.samples == 4
    written = json.loads((tmp_path / "metrics" / "eval.json").read_text())
    assert written == result.metrics
    header = (tmp_path / "reports" / "eval_pck.csv").read_text().splitlines()[0]
    assert header == "threshold_px,trained,untrained,identity"
    for name in ("eval_pck.png", "eval_samples.png"):
        assert (tmp_path / "reports" / name).read_bytes()[:4] == b"\x89PNG"
    run = client.get_run(run_id)
    assert run.data.metrics["eval/corr/pck_3"] == pytest.approx(written["corr"]["pck_3"])
    assert "eval.skipped.dist/fid" in run.data.tags
    assert run.data.tags["collapse"] == ("suspected" if written["collapse"]["suspected"] else "no")
    logged = {f.path for f in client.list_artifacts(run_id, "eval")}
    assert logged == {"eval/eval.json", "eval/samples.png", "eval/pck.png", "eval/pck.json"}


def test_register_promotes_only_a_better_model(tmp_path):
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("e", artifact_location=(tmp_path / "art").as_uri())
    cfg = RegisterConfig(name="m", metric="corr/pck_3")

    def candidate(pck: float):
        run_id = client.create_run(experiment).info.run_id
        return f"runs:/{run_id}/model", run_id, {"corr": {"pck_3": pck}}

    first = register_model(client, *candidate(0.30), cfg)
    assert (first.version, first.promoted, first.reason) == (1, True, "first registered model")
    worse = register_model(client, *candidate(0.20), cfg)
    assert (worse.version, worse.promoted, worse.champion_version, worse.champion_value) == (2, False, 1, 0.30)
    assert int(client.get_model_version_by_alias("m", CHAMPION).version) == 1
    assert int(client.get_model_version_by_alias("m", CHALLENGER).version) == 2
    tags = client.get_model_version("m", "2").tags
    assert tags["register.decision"] == "kept_champion" and "does not beat champion v1" in tags["register.reason"]
    again = register_model(client, f"runs:/{candidate(0)[1]}/model", None, {"corr": {"pck_3": 0.5}}, cfg)
    assert again.promoted and int(client.get_model_version_by_alias("m", CHAMPION).version) == again.version
    assert again.to_metrics() == {"version": 3, "promoted": 1, "value": 0.5, "previous_champion_version": 1,
                                  "previous_champion_value": 0.3}

    uri, run_id, metrics = candidate(0.9)  # the same model registered twice is one version
    assert register_model(client, uri, run_id, metrics, cfg).version == register_model(client, uri, run_id,
                                                                                       metrics, cfg).version
    lower = RegisterConfig(name="m", metric="corr/epe", greater_is_better=False)
    with pytest.raises(ValueError, match="no metric 'corr/epe'"):
        register_model(client, uri, run_id, metrics, lower)
