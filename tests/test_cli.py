"""The `cocosnet` command line: help, translate (one pair, folders, CSV, registry alias), convert-official, info."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.cli import COMMANDS, STAGES, main
from pipeline.model_files import read_model_files
from tests.conftest import REPO_ROOT
from tests.tiny_translation import SIZE, write_pose

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------- help and the entry point


@pytest.mark.parametrize("command", [*COMMANDS, *STAGES])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and out.startswith(f"usage: cocosnet {command} ")


def test_entry_point_help_is_fast_and_imports_nothing_heavy():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", "pipeline.cli", "--help"], capture_output=True, text=True, env=env,
                          cwd=REPO_ROOT, timeout=60)
    assert done.returncode == 0 and all(f"    {name}" in done.stdout for name in [*COMMANDS, *STAGES])
    probe = "import sys; from pipeline.cli import build_parser; build_parser(); " \
            "print(sorted(m for m in ('torch', 'mlflow', 'ray', 'numpy') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr
    script = shutil.which("cocosnet", path=str(Path(sys.executable).parent))
    assert script, "no cocosnet console script beside this Python: install the project (scripts/bootstrap.sh)"
    done = subprocess.run([script, "translate", "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and "centre-cropped" in done.stdout  # the aspect policy


def test_usage_errors_exit_2(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["translate", "--input", "a.png"])  # --out is required
    assert exit_info.value.code == 2
    code, _, err = run_cli(capsys, "translate", "--input", "a.png", "--out", tmp_path / "o.png")
    assert code == 2 and "give --input and --exemplar" in err
    code, _, err = run_cli(capsys, "translate", "--pairs", "p.csv", "--input", "a.png", "--out", tmp_path)
    assert code == 2 and "--pairs replaces --input" in err
    with pytest.raises(SystemExit) as exit_info:
        main(["convert-official", "--corr", "c", "--gen", "g", "--opt", "o", "--out", "d", "--image-size", "100", "64"])
    assert exit_info.value.code == 2


@pytest.mark.parametrize("stage", STAGES)
def test_a_dvc_stage_is_its_cocosnet_subcommand(stage, capsys):
    """`python -m stages.<stage>` (what dvc.yaml runs) takes the same arguments and gives the same errors."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    done = subprocess.run([sys.executable, "-m", f"stages.{stage}", "--params", "missing.yaml"], capture_output=True,
                          text=True, env=env, cwd=REPO_ROOT, timeout=120)
    code, _, err = run_cli(capsys, stage, "--params", "missing.yaml")
    assert done.returncode == code == 1
    assert done.stderr == err == f"cocosnet {stage}: error: missing.yaml: params file not found (run from the " \
                                 "repository root)\n"


# ---------------------------------------------------------------- translate


def test_translate_one_pair_with_warped_levels(model_dir, pairs, tmp_path, capsys):
    out = tmp_path / "result" / "s0.png"
    code, stdout, err = run_cli(capsys, "translate", "--model", model_dir, "--input", pairs["maps"] / "s0.png",
                                "--exemplar", pairs["photos"] / "s0.jpg", "--exemplar-map",
                                pairs["photo_maps"] / "s0.png", "--out", out, "--save-warped")
    assert code == 0, err
    assert "1 written, 0 failed" in stdout
    assert Image.open(out).size == SIZE[::-1]
    assert [Image.open(out.with_name(f"s0_warped_l{level}.png")).size[0] for level in range(4)] == [8, 16, 32, 64]
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_translate_folders_reports_a_corrupt_file_and_writes_the_rest(model_dir, pairs, tmp_path, capsys):
    maps = tmp_path / "maps"
    shutil.copytree(pairs["maps"], maps)
    (maps / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (maps / "lonely.png").write_bytes((maps / "s0.png").read_bytes())  # no exemplar of that name
    photos = tmp_path / "photos"
    shutil.copytree(pairs["photos"], photos)
    shutil.copy(photos / "s0.jpg", photos / "broken.jpg")
    photo_maps = tmp_path / "photo_maps"
    shutil.copytree(pairs["photo_maps"], photo_maps)
    shutil.copy(photo_maps / "s0.png", photo_maps / "broken.png")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "translate", "--model", model_dir, "--input", maps, "--exemplar", photos,
                                "--exemplar-map", photo_maps, "--out", out, "--batch-size", "2", "--no-progress")
    assert code == 1
    assert "3 written, 2 failed" in stdout
    assert f"cocosnet translate: error: {maps / 'broken.png'}: corrupt or truncated label map" in err
    assert f"{maps / 'lonely.png'}: no exemplar photo named lonely.* in {photos}" in err
    assert sorted(p.name for p in out.iterdir()) == ["s0.png", "s1.png", "s2.png"]


def test_translate_pairs_from_csv(model_dir, pairs, tmp_path, capsys):
    table = tmp_path / "pairs.csv"
    rel = lambda p: os.path.relpath(p, tmp_path)  # noqa: E731 - paths relative to the CSV
    table.write_text("input,exemplar,exemplar_map,out\n"
                     f"{rel(pairs['maps'] / 's0.png')},{rel(pairs['photos'] / 's1.jpg')},"
                     f"{rel(pairs['photo_maps'] / 's1.png')},first.png\n"
                     f"{rel(pairs['maps'] / 's1.png')},{rel(pairs['photos'] / 's2.jpg')},"
                     f"{rel(pairs['photo_maps'] / 's2.png')},\n"
                     f"{rel(pairs['maps'] / 's2.png')},,,third.png\n")
    out = tmp_path / "out"
    code, stdout, err = run_cli(capsys, "translate", "--model", model_dir, "--pairs", table, "--out", out)
    assert code == 1 and "2 written, 1 failed" in stdout
    assert f"{table}:4: empty exemplar" in err
    assert sorted(p.name for p in out.iterdir()) == ["first.png", "s1.png"]
    table.write_text("input,exemplar,examplar_map\n")
    code, _, err = run_cli(capsys, "translate", "--model", model_dir, "--pairs", table, "--out", out)
    assert code == 1 and "unknown ['examplar_map']" in err


def test_translate_errors_name_the_file(model_dir, pairs, tmp_path, capsys):
    ids = tmp_path / "ids.png"
    Image.fromarray(np.full((64, 64), 200, np.uint8), "L").save(ids)
    code, _, err = run_cli(capsys, "translate", "--model", model_dir, "--input", ids, "--exemplar",
                           pairs["photos"] / "s0.jpg", "--exemplar-map", pairs["photo_maps"] / "s0.png",
                           "--out", tmp_path / "o.png")
    assert code == 1 and f"cocosnet translate: error: {ids}: class id 200 is outside 0..11" in err
    code, _, err = run_cli(capsys, "translate", "--model", tmp_path / "nope", "--input", ids, "--exemplar",
                           pairs["photos"] / "s0.jpg", "--out", tmp_path / "o.png")
    assert code == 1 and f"{tmp_path / 'nope'}: neither a model folder nor an MLflow model URI" in err
    assert not (tmp_path / "o.png").exists()


def test_translate_with_a_registry_alias(model_dir, pairs, tmp_path, capsys, monkeypatch):
    import mlflow

    from pipeline import tracking
    from pipeline.tracking import MlflowConfig

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    experiment = tracking.ensure_experiment(uri, MlflowConfig(experiment="cli-test"), base=tmp_path)
    net = read_model_files(model_dir)
    args = ["--input", pairs["maps"] / "s0.png", "--exemplar", pairs["photos"] / "s0.jpg",
            "--exemplar-map", pairs["photo_maps"] / "s0.png"]
    mlflow.set_tracking_uri(uri)
    try:
        with mlflow.start_run(experiment_id=experiment):
            model_uri = tracking.log_model(net.state_dict(), net.cfg)
        version = mlflow.register_model(model_uri, "tiny")
        mlflow.MlflowClient(uri).set_registered_model_alias("tiny", "champion", version.version)
        code, _, err = run_cli(capsys, "translate", "--model", "models:/tiny@champion", *args,
                               "--out", tmp_path / "a.png")
    finally:
        mlflow.set_tracking_uri(None)
    assert code == 0, err
    assert run_cli(capsys, "translate", "--model", model_dir, *args, "--out", tmp_path / "b.png")[0] == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.asarray(Image.open(tmp_path / "b.png")))


# ---------------------------------------------------------------- convert-official


def official_opt_txt(opt: dict) -> str:
    """The official BaseOptions.print_options table."""
    lines = ["----------------- Options ---------------"]
    lines += ["{:>25}: {:<30}{}".format(k, str(v), "\t[default: x]" if i % 3 == 0 else "")
              for i, (k, v) in enumerate(sorted(opt.items()))]
    return "\n".join(lines + ["----------------- End -------------------", ""])


@pytest.fixture(scope="module")
def official_files(official_v2_dir, tmp_path_factory):
    """The parity fixture as the official code saves a run: two .pth state dicts, opt.txt and opt.pkl."""
    weights = torch.load(official_v2_dir / "weights.pt", weights_only=True)
    opt = torch.load(official_v2_dir / "case_a.pt", weights_only=True)["opt"]
    opt = {k: v for k, v in opt.items() if k != "semantic_nc"}  # set after the official opt files are written
    folder = tmp_path_factory.mktemp("official")
    torch.save(weights["netCorr"], folder / "latest_net_Corr.pth")
    torch.save(weights["netG"], folder / "latest_net_G.pth")
    (folder / "opt.txt").write_text(official_opt_txt(opt))
    with (folder / "opt.pkl").open("wb") as f:
        pickle.dump(argparse.Namespace(**opt), f)
    return folder, weights, opt


def test_convert_official_then_translate_a_pose(official_files, pairs, tmp_path, capsys):
    folder, weights, opt = official_files
    out = tmp_path / "official"
    code, stdout, err = run_cli(capsys, "convert-official", "--corr", folder / "latest_net_Corr.pth",
                                "--gen", folder / "latest_net_G.pth", "--opt", folder / "opt.txt",
                                "--out", out, "--image-size", "128", "128")
    assert code == 0, err
    assert "128x128, label_nc 20, nef 8, ngf 4" in stdout
    net = read_model_files(out)
    assert net.cfg.official_compat and net.cfg.patchmatch_iters == opt["iteration_count"]
    state = net.state_dict()
    assert all(torch.equal(state[f"corr.{k}"], v.float()) for k, v in weights["netCorr"].items())
    assert all(torch.equal(state[f"generator.{k}"], v.float()) for k, v in weights["netG"].items())
    run = json.loads((out / "run.json").read_text())
    assert run["task"] == "pose" and run["source"] == "official CoCosNet-v2" and len(run["sha256"]) == 3

    candidate = write_pose(tmp_path, "person", (80, 96))
    exemplar_pose = write_pose(tmp_path, "exemplar", (80, 96), shift=0.05)
    code, stdout, err = run_cli(capsys, "translate", "--model", out, "--input", candidate, "--exemplar",
                                pairs["photos"] / "s0.jpg", "--exemplar-map", exemplar_pose,
                                "--out", tmp_path / "person.png")
    assert code == 0, err
    assert Image.open(tmp_path / "person.png").size == (128, 128)

    code, _, err = run_cli(capsys, "translate", "--model", out, "--input", pairs["maps"] / "s0.png", "--exemplar",
                           pairs["photos"] / "s0.jpg", "--out", tmp_path / "x.png")
    assert code == 1 and "pose input must be OpenPose keypoints" in err  # the recorded task: pose


def test_convert_official_reads_opt_pkl_at_the_official_size(official_files, tmp_path, capsys):
    folder, _, _ = official_files
    out = tmp_path / "official"
    code, _, err = run_cli(capsys, "convert-official", "--corr", folder / "latest_net_Corr.pth",
                           "--gen", folder / "latest_net_G.pth", "--opt", folder / "opt.pkl", "--out", out)
    assert code == 0, err
    assert json.loads((out / "model_config.json").read_text())["image_size"] == [512, 512]


def test_convert_official_refuses_unsafe_or_wrong_files(official_files, tmp_path, capsys):
    folder, _, _ = official_files
    corr, gen, opt = folder / "latest_net_Corr.pth", folder / "latest_net_G.pth", folder / "opt.txt"
    pickled_net = tmp_path / "pickled_net_G.pth"
    torch.save({"net": argparse.Namespace(weights=1)}, pickled_net)  # an object, not a state dict
    code, _, err = run_cli(capsys, "convert-official", "--corr", corr, "--gen", pickled_net, "--opt", opt,
                           "--out", tmp_path / "m")
    assert code == 1 and f"{pickled_net}: refusing to load" in err and "argparse.Namespace" in err
    bad_opt = tmp_path / "opt.pkl"
    bad_opt.write_bytes(pickle.dumps({"when": __import__("datetime").date(2021, 6, 1)}))
    code, _, err = run_cli(capsys, "convert-official", "--corr", corr, "--gen", gen, "--opt", bad_opt,
                           "--out", tmp_path / "m")
    assert code == 1 and f"{bad_opt}: refusing to unpickle: it references datetime.date" in err
    code, _, err = run_cli(capsys, "convert-official", "--corr", gen, "--gen", corr, "--opt", opt,
                           "--out", tmp_path / "m")
    assert code == 1 and "does not match the CoCosNet-v2 architecture" in err
    keep = tmp_path / "documents"
    keep.mkdir()
    (keep / "notes.txt").write_text("mine")
    code, _, err = run_cli(capsys, "convert-official", "--corr", corr, "--gen", gen, "--opt", opt, "--out", keep)
    assert code == 1 and "is not a model folder" in err and (keep / "notes.txt").exists()
    assert not (tmp_path / "m").exists()


@pytest.fixture(scope="module")
def official_v1_files(official_v1_dir, tmp_path_factory):
    """The v1 parity fixture (ADE20k command, ngf 8) as the official code saves a run."""
    weights = torch.load(official_v1_dir / "weights_a.pt", weights_only=False)
    opt = torch.load(official_v1_dir / "case_a.pt", weights_only=False)["opt"]
    opt = {k: v for k, v in opt.items() if k not in ("semantic_nc", "down")}  # set after opt.txt is written
    folder = tmp_path_factory.mktemp("official_v1")
    torch.save(weights["netCorr"], folder / "latest_net_Corr.pth")
    torch.save(weights["netG"], folder / "latest_net_G.pth")
    (folder / "opt.txt").write_text(official_opt_txt(opt))
    return folder, weights


def test_convert_official_v1_then_translate_a_mask(official_v1_files, pairs, tmp_path, capsys):
    folder, weights = official_v1_files
    files = ["--corr", folder / "latest_net_Corr.pth", "--gen", folder / "latest_net_G.pth", "--opt",
             folder / "opt.txt"]
    code, _, err = run_cli(capsys, "convert-official", *files, "--out", tmp_path / "m")
    assert code == 1 and "convert them with --version 1" in err  # v2 is the default
    out = tmp_path / "ade20k-v1"
    code, stdout, err = run_cli(capsys, "convert-official", "--version", "1", *files, "--out", out,
                                "--image-size", "64", "64")
    assert code == 0, err
    assert "64x64, label_nc 151, CoCosNet v1, ngf 8" in stdout
    net = read_model_files(out)
    assert net.cfg.version == 1 and net.cfg.warp_mask and net.cfg.warp_upsample == "nearest"
    state = net.state_dict()
    assert torch.equal(state["corr.layer.1.model.5.bias"], weights["netCorr"]["layer.1.conv2.bias"].float())
    assert torch.equal(state["generator.attn.gamma"], weights["netG"]["attn.gamma"].float())
    run = json.loads((out / "run.json").read_text())
    assert run["task"] == "mask" and run["source"] == "official CoCosNet (v1)"
    code, _, err = run_cli(capsys, "translate", "--model", out, "--input", pairs["maps"] / "s0.png", "--exemplar",
                           pairs["photos"] / "s1.jpg", "--exemplar-map", pairs["photo_maps"] / "s1.png",
                           "--out", tmp_path / "a.png", "--save-warped")
    assert code == 0, err
    assert Image.open(tmp_path / "a.png").size == (64, 64)
    assert [Image.open(tmp_path / f"a_warped_l{i}.png").size for i in (0, 1)] == [(16, 16), (64, 64)]


# ---------------------------------------------------------------- info and figure


def test_info_prints_config_parameters_and_manifest(model_dir, train_shards, capsys):
    code, stdout, err = run_cli(capsys, "info", "--model", model_dir, "--shards", train_shards, "--json")
    assert code == 0, err
    report = json.loads(stdout)
    net = read_model_files(model_dir)
    assert report["config"] == net.cfg.to_dict()
    assert report["parameters"]["total"] == sum(p.numel() for p in net.parameters())
    assert report["parameters"]["corr"] == sum(v for k, v in report["parameters"].items() if k.startswith("corr."))
    assert report["data"]["label_nc"] == 12 and report["data"]["splits"]["val"]["shards"] == 4
    code, stdout, _ = run_cli(capsys, "info", "--model", model_dir, "--shards", train_shards)
    assert code == 0 and "corr.patch_match" in stdout and "synthetic mask, 64x64" in stdout
    code, _, err = run_cli(capsys, "info", "--model", model_dir, "--shards", train_shards.parent / "nothing")
    assert code == 1 and "manifest.json: file not found" in err


def test_figure_command_writes_the_grid(model_dir, train_shards, tmp_path, capsys):
    code, _, err = run_cli(capsys, "figure", "--model", model_dir, "--shards", train_shards, "--rows", "2",
                           "--out", tmp_path / "fig.png")
    assert code == 0, err
    assert Image.open(tmp_path / "fig.png").size == (4 * 192 + 6, 28 + 2 * 192 + 2)
