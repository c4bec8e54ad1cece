"""The whole pipeline as users run it: the repository copied to a fresh git repo, `dvc repro` on a micro
configuration (prepare -> shard -> train -> evaluate -> register), then an experiment with another learning
rate through `dvc exp run -S`, and the DVC views of metrics, plots and experiments."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
MICRO = {
    "data": {"image_size": 64, "synthetic": {"num_images": 24}},
    "shard": {"pseudo_per_image": 1, "samples_per_shard": 4, "min_shards_per_split": 2, "val_fraction": 0.25,
              "num_workers": 1},
    "model": {"nef": 8, "ngf": 8, "ndf": 8, "spade_hidden": 16, "patchmatch_iters": 1, "num_d": 1},
    "train": {"steps": 4, "batch_size": 2, "checkpoint_every": 2, "log_every": 2, "image_every": 2,
              "cpus_per_worker": 1},
    "evaluate": {"batch_size": 4, "grid_rows": 2},
}


def merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = merge(base.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> str:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-6000:]}")
    return result.stdout


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """The repository's files (tracked and new, not ignored) in a new git repo with micro params, committed."""
    work = tmp_path_factory.mktemp("dvc_repo") / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                           check=True, capture_output=True, text=True).stdout.split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file() and name != "dvc.lock":  # a fresh clone has no results yet
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, work / name)
    params = yaml.safe_load((work / "params.yaml").read_text())
    (work / "params.yaml").write_text(yaml.safe_dump(merge(params, MICRO), sort_keys=False))
    bin_dir = str(Path(sys.executable).parent)  # the stages run `python -m stages.<name>` with this interpreter
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", "DVC_NO_ANALYTICS": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1",
           "GIT_AUTHOR_NAME": "test", "GIT_AUTHOR_EMAIL": "test@example.com", "GIT_COMMITTER_NAME": "test",
           "GIT_COMMITTER_EMAIL": "test@example.com", "PYTHONPATH": str(work)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the copy's own sqlite:///mlflow.db
    for cmd in (["git", "init", "-q", "-b", "main"], ["git", "add", "-A"], ["git", "commit", "-qm", "micro"]):
        run(cmd, work, env)
    return work, env


def registry(work: Path):
    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{work / 'mlflow.db'}")


def test_dvc_repro_runs_the_whole_chain_and_registers_a_champion(repo):
    work, env = repo
    out = run([sys.executable, "-m", "dvc", "repro"], work, env)
    for stage in ("prepare", "shard", "train", "evaluate", "register"):
        assert f"Running stage '{stage}'" in out
    assert "PCK@3px" in out and "colour error" in out  # evaluate prints trained vs untrained

    for path in ("models/state_dict.pt", "models/model_config.json", "reports/train_losses.png",
                 "reports/eval_pck.png", "reports/eval_samples.png", "dvc.lock"):
        assert (work / path).is_file(), path
    evaluation = json.loads((work / "metrics/eval.json").read_text())
    assert evaluation["samples"] == 6
    assert 0 <= evaluation["corr"]["pck_3"] <= 1 and evaluation["style"]["colour_error"] > 0
    assert set(evaluation["untrained"]) >= {"corr", "recon", "style", "dist"}
    decision = json.loads((work / "metrics/register.json").read_text())
    assert decision == {"version": 1, "promoted": 1, "value": evaluation["corr"]["pck_3"]}

    client = registry(work)
    assert int(client.get_model_version_by_alias("cocosnet", "champion").version) == 1
    assert int(client.get_model_version_by_alias("cocosnet", "challenger").version) == 1
    run_id = json.loads((work / "models/run.json").read_text())["mlflow_run_id"]
    assert client.get_run(run_id).data.metrics["eval/corr/pck_3"] == pytest.approx(evaluation["corr"]["pck_3"])

    assert "Data and pipelines are up to date" in run([sys.executable, "-m", "dvc", "status"], work, env)


def test_dvc_exp_run_registers_a_challenger_and_dvc_views_work(repo):
    work, env = repo
    run(["git", "add", "-A"], work, env)
    run(["git", "commit", "-qm", "baseline results"], work, env)
    out = run([sys.executable, "-m", "dvc", "exp", "run", "-S", "train.lr=0.001"], work, env)
    assert "Running stage 'train'" in out and "Running stage 'prepare'" not in out  # data stages are cached

    decision = json.loads((work / "metrics/register.json").read_text())
    assert decision["version"] == 2 and decision["previous_champion_version"] == 1
    client = registry(work)
    assert int(client.get_model_version_by_alias("cocosnet", "challenger").version) == 2
    champion = int(client.get_model_version_by_alias("cocosnet", "champion").version)
    assert champion == (2 if decision["promoted"] else 1)
    tags = client.get_model_version("cocosnet", "2").tags
    assert tags["register.decision"] == ("promoted" if decision["promoted"] else "kept_champion")

    metrics = json.loads(run([sys.executable, "-m", "dvc", "metrics", "show", "--json"], work, env))
    shown = json.dumps(metrics)
    assert "pck_3" in shown and "promoted" in shown
    plots = json.loads(run([sys.executable, "-m", "dvc", "plots", "show", "--json"], work, env))
    assert {"pck", "reports/train_losses.csv", "reports/eval_samples.png"} <= set(plots["data"])
    points = plots["data"]["pck"][0]["content"]["data"]["values"]
    assert {p["field"] for p in points} == {"trained", "untrained", "identity"}
    assert len(points) == 3 * 21  # thresholds 0, 0.5, ..., 10 px
    table = run([sys.executable, "-m", "dvc", "exp", "show", "--md"], work, env)
    assert "train.lr" in table and "0.001" in table and "corr.pck_3" in table


def test_dvc_repro_shard_rebuilds_a_truncated_tar(repo):
    work, env = repo
    run([sys.executable, "-m", "dvc", "repro", "shard"], work, env)
    tar = work / "data/shards/train-00000.tar"
    intact = tar.read_bytes()
    tar.write_bytes(intact[: len(intact) // 2])  # what an interrupted copy or a full disk leaves
    out = run([sys.executable, "-m", "dvc", "repro", "shard"], work, env)
    assert "Running stage 'shard'" in out and tar.read_bytes() == intact
    manifest = json.loads((work / "data/shards/manifest.json").read_text())
    assert {"name": "train-00000.tar", "bytes": len(intact)}.items() <= manifest["splits"]["train"]["shards"][0].items()
    assert "Data and pipelines are up to date" in run([sys.executable, "-m", "dvc", "status", "shard"], work, env)
