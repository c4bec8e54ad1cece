"""Training without Ray: configs from params, one step, the NaN guard, checkpoints, data position, export."""
from __future__ import annotations

import copy
import functools
import json
import random

import numpy as np
import pytest
import torch

from model import ModelConfig
from model.vgg import VGG19, load_vgg19
from pipeline.data.config import DataConfig, ShardConfig
from pipeline.data.loader import make_loader, to_model
from pipeline.params import load_params
from pipeline.train.checkpoint import (RAY_SNAPSHOT_FILE, DataPosition, find_checkpoint, load_state, read_meta,
                                       restore_rank_state, restore_training_state, save_rank_state, save_training_state)
from pipeline.train.config import TrainConfig, configs_from_params
from pipeline.train.launch import describe_failure
from pipeline.train.loop import batch_stream, training_batch
from pipeline.train.step import NonFiniteLossError, build_parts, set_rates, train_step
from pipeline.model_files import export_model, load_model, read_model_files
from pipeline.tracking import absolute_tracking_uri, flatten_params
from pipeline.viz import grid_columns, sample_grid
from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_MODEL = {"nef": 8, "ngf": 8, "ndf": 8, "spade_hidden": 16, "patchmatch_iters": 1, "num_d": 1,
              "n_layers_d": 3, "temperature": 0.05}


@functools.cache
def random_vgg() -> VGG19:
    with pytest.warns(UserWarning, match="RANDOM"):
        return load_vgg19("random", seed=0)


TINY_V1_MODEL = {"version": 1, "ngf": 8, "ndf": 8, "spade_hidden": 16, "match_channels": 32, "num_d": 1,
                 "n_layers_d": 3, "temperature": 0.05}


def tiny_parts(seed: int = 0, model: dict | None = None, class_channels=None, **train):
    torch.manual_seed(seed)
    cfg = TrainConfig(**{"lr": 2e-4, **train})
    model_cfg = ModelConfig.from_dict({**(model or TINY_MODEL), "image_size": [64, 64], "label_nc": 12})
    return build_parts(model_cfg, cfg.loss_weights, random_vgg(), lr=cfg.lr, ttur=cfg.ttur,
                       g_adam_eps=cfg.g_adam_eps, amp=cfg.amp, device=torch.device("cpu"),
                       generator_lr_scale=cfg.generator_lr_scale, class_channels=class_channels)


@pytest.fixture(scope="module")
def batch(train_shards):
    loader = make_loader(train_shards, batch_size=2, num_workers=0, real_exemplar_prob=0.5)
    return to_model(next(iter(loader)), 12)


def snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ---------------------------------------------------------------- configuration


MANIFEST = {"image_size": [64, 64], "label_nc": 12}  # what configs_from_params reads from the shards' manifest

V1_PARAMS = ["params/ade20k-v1.yaml", "params/celebahq-edge-v1.yaml", "params/deepfashion-v1.yaml"]


@pytest.mark.parametrize("path", ["params.yaml", "params/deepfashion-512-gpu.yaml", "params/synthetic-quality.yaml",
                                  *V1_PARAMS])
def test_shipped_params_files_give_valid_configs(path):
    params = load_params(REPO_ROOT / path)
    data = DataConfig.from_params(params["data"])
    ShardConfig.from_params(params["shard"])
    train, model, mlflow_cfg = configs_from_params(params, {"image_size": data.image_size, "label_nc": data.label_nc})
    assert model.image_size == data.image_size and model.label_nc == data.label_nc
    assert train.steps >= 1 and mlflow_cfg.experiment
    assert model.version == (1 if path in V1_PARAMS else 2)
    if path in V1_PARAMS:  # the official v1 schedule: constant, then a linear decay over the second half
        assert train.lr_decay_steps == train.steps // 2 and train.lr == 2e-4 and train.global_batch == 32


def test_config_errors_name_the_problem():
    with pytest.raises(ValueError, match=r"train: unknown keys \['stpes'\]"):
        configs_from_params({"train": {"stpes": 3}}, MANIFEST)
    with pytest.raises(ValueError, match="unknown loss weights"):
        configs_from_params({"train": {"loss": {"warp": 1.0}}}, MANIFEST)
    with pytest.raises(ValueError, match=r"model.image_size: the model takes it from the shards' manifest \(\[64, 64\]\)"):
        configs_from_params({"model": {"image_size": 128}}, MANIFEST)
    with pytest.raises(ValueError, match="model.label_nc: the model takes it from the shards' manifest"):
        configs_from_params({"model": {"label_nc": 20}}, MANIFEST)
    with pytest.raises(ValueError, match=r"model: unknown keys \[.nfe.\]"):
        configs_from_params({"model": {"nfe": 8}}, MANIFEST)
    with pytest.raises(ValueError, match="amp"):
        TrainConfig(amp="fp8")
    train, model, _ = configs_from_params({"model": {"nef": 8}}, {"image_size": [64, 96], "label_nc": 3})
    assert model.image_size == (64, 96) and model.label_nc == 3 and model.nef == 8  # from the manifest


def test_tracking_uri_and_params_helpers(tmp_path):
    assert absolute_tracking_uri("sqlite:///mlflow.db", tmp_path) == f"sqlite:///{tmp_path}/mlflow.db"
    assert absolute_tracking_uri("sqlite:////abs/x.db", tmp_path) == "sqlite:////abs/x.db"
    assert absolute_tracking_uri("http://127.0.0.1:5000", tmp_path) == "http://127.0.0.1:5000"
    assert flatten_params({"train": {"lr": 1e-4, "loss": {}}, "data": {"image_size": [64, 64]}}) == {
        "train.lr": "0.0001", "train.loss": "{}", "data.image_size": "[64, 64]"}


# ---------------------------------------------------------------- one step


def test_ttur_optimizers_follow_the_paper():
    parts = tiny_parts(lr=2e-4)
    g, d = parts.opt_g.param_groups[0], parts.opt_d.param_groups[0]
    assert g["lr"] == pytest.approx(1e-4) and d["lr"] == pytest.approx(4e-4)
    assert g["betas"] == (0.0, 0.9) and d["betas"] == (0.0, 0.9) and g["eps"] == 1e-3
    assert parts.amp_dtype is None and not parts.scaler_g.is_enabled()  # AMP is CUDA-only
    no_ttur = tiny_parts(ttur=False, amp="bf16")
    assert no_ttur.opt_g.param_groups[0]["lr"] == no_ttur.opt_d.param_groups[0]["lr"] == pytest.approx(2e-4)
    assert no_ttur.amp_dtype is None  # bf16 requested, but this is a CPU


def test_learning_rate_schedules():
    cfg = TrainConfig(steps=10, lr=2e-4, lr_decay_steps=4)
    assert [cfg.lr_factor(step) for step in range(1, 11)] == [1.0] * 7 + [0.75, 0.5, 0.25]
    assert TrainConfig(steps=10).lr_factor(10) == 1.0
    with pytest.raises(ValueError, match=r"lr_decay_steps must be in \[0, steps=10\]"):
        TrainConfig(steps=10, lr_decay_steps=11)
    # ttur: G at lr/2 and D at 2 lr all run long, both decayed; official (CoCosNet-v2's trainer): TTUR in epoch 0 only.
    assert cfg.rates(1, epoch=0) == cfg.rates(1, epoch=3) == pytest.approx((1e-4, 4e-4))
    assert cfg.rates(9, epoch=3) == pytest.approx((0.5e-4, 2e-4))
    official = TrainConfig(steps=10, lr=2e-4, lr_decay_steps=4, schedule="official")
    assert official.rates(1, epoch=0) == pytest.approx((1e-4, 4e-4))
    assert official.rates(2, epoch=1) == pytest.approx((2e-4, 2e-4))
    assert official.rates(9, epoch=1) == pytest.approx((1e-4, 1e-4))
    assert TrainConfig(lr=2e-4, ttur=False).rates(1, epoch=0) == pytest.approx((2e-4, 2e-4))
    with pytest.raises(ValueError, match="train.schedule must be ttur or official"):
        TrainConfig(schedule="cosine")
    parts = tiny_parts(lr=2e-4)
    set_rates(parts, *official.rates(2, epoch=1))
    assert parts.opt_g.param_groups[0]["lr"] == parts.opt_d.param_groups[0]["lr"] == pytest.approx(2e-4)


def test_generator_lr_scale_gives_the_image_generator_its_own_rate(batch):
    """train.generator_lr_scale: the image generator's parameters in their own group at that multiple of G's rate,
    through the schedule; the correspondence keeps G's rate. At 1 (the official) G stays one group."""
    assert len(tiny_parts().opt_g.param_groups) == 1
    parts = tiny_parts(lr=2e-4, generator_lr_scale=10.0)
    correspondence, image_generator = parts.opt_g.param_groups
    assert {id(p) for p in image_generator["params"]} == {id(p) for p in parts.net.generator.parameters()}
    assert len(correspondence["params"]) + len(image_generator["params"]) == len(list(parts.net.parameters()))
    assert correspondence["lr"] == pytest.approx(1e-4) and image_generator["lr"] == pytest.approx(1e-3)
    set_rates(parts, 0.5e-4, 2e-4)
    assert correspondence["lr"] == pytest.approx(0.5e-4) and image_generator["lr"] == pytest.approx(0.5e-3)
    assert parts.opt_d.param_groups[0]["lr"] == pytest.approx(2e-4)
    train_step(parts, batch)  # both groups step
    with pytest.raises(ValueError, match="generator_lr_scale must be > 0"):
        TrainConfig(generator_lr_scale=0)


def test_v1_train_step_has_the_v1_terms(batch):
    parts = tiny_parts(model=TINY_V1_MODEL, loss={"mask": 100.0, "perceptual_r52": 0.01, "warp_self": 100.0})
    assert parts.g_loss.finest_warp_only and hasattr(parts.discriminator.discriminator_0, "attn")
    g_before, d_before = snapshot(parts.net), snapshot(parts.discriminator)
    losses, out = train_step(parts, batch, step=1)
    assert {"g/mask", "g/warp", "g/perc", "g/domain", "g/reg", "g/context"} <= set(losses)
    assert all(np.isfinite(v) for v in losses.values()) and losses["g/mask"] > 0
    changed_g = {k.split(".")[1] for k, v in parts.net.state_dict().items() if not torch.equal(v, g_before[k])}
    assert {"adaptive_model_seg", "adaptive_model_img", "layer", "theta", "phi", "head_0", "attn"} <= changed_g
    assert not torch.equal(parts.discriminator.state_dict()["discriminator_0.attn.gamma"],
                           d_before["discriminator_0.attn.gamma"])
    assert [tuple(w.shape) for w in out.warped] == [(2, 3, 16, 16), (2, 3, 64, 64)]


def test_class_nce_trains_the_matching_features_through_the_step(batch):
    """loss.class_nce reads the classes from the shards' class channels (the mask task: all of them)."""
    parts, without = tiny_parts(loss={"class_nce": 10.0}, class_channels=(0, 12)), tiny_parts()
    losses, _ = train_step(parts, batch, step=1)
    assert losses["g/class"] > 0 and "g/class" not in train_step(without, batch, step=1)[0]
    # Same initial weights and batch: the term alone makes the matching layers' updates differ
    theta = [p.net.state_dict()["corr.theta_0.weight"] for p in (parts, without)]
    assert not torch.equal(*theta)
    with pytest.raises(ValueError, match="class_channels"):
        tiny_parts(loss={"class_nce": 10.0})
    with pytest.raises(ValueError, match="class_nce needs model.version 2"):
        tiny_parts(model=TINY_V1_MODEL, loss={"class_nce": 1.0}, class_channels=(0, 12))


def test_train_step_updates_generator_and_discriminator(batch):
    parts = tiny_parts()
    g_before, d_before = snapshot(parts.net), snapshot(parts.discriminator)
    losses, out = train_step(parts, batch, step=1)
    expected = {"g/feat", "g/perc", "g/context", "g/gan", "g/gan_feat", "g/domain", "g/reg", "g/warp", "g/total",
                "d/d_fake", "d/d_real", "d/total"}
    assert set(losses) == expected and all(np.isfinite(v) for v in losses.values())
    g_terms = [v for k, v in losses.items() if k.startswith("g/") and k != "g/total"]
    assert losses["g/total"] == pytest.approx(sum(g_terms))
    changed_g = [k for k, v in parts.net.state_dict().items() if not torch.equal(v, g_before[k])]
    changed_d = [k for k, v in parts.discriminator.state_dict().items() if not torch.equal(v, d_before[k])]
    assert any(k.startswith("corr.") for k in changed_g) and any(k.startswith("generator.") for k in changed_g)
    assert any(k.endswith("weight_orig") for k in changed_d)
    assert out.image.shape == (2, 3, 64, 64)


def test_pseudo_only_terms_vanish_for_real_exemplars(batch):
    parts = tiny_parts()
    real = dict(batch, is_pseudo=torch.zeros(2, dtype=torch.bool))
    pseudo = dict(batch, is_pseudo=torch.ones(2, dtype=torch.bool))
    real_losses, _ = train_step(parts, real)
    pseudo_losses, _ = train_step(parts, pseudo)
    assert real_losses["g/feat"] == 0 and real_losses["g/warp"] == 0  # no pixel-level target without a pseudo pair
    assert pseudo_losses["g/feat"] > 0 and pseudo_losses["g/warp"] > 0
    assert real_losses["g/context"] > 0 and real_losses["g/gan_feat"] > 0  # the rest applies to both


def test_non_finite_loss_names_the_term_and_applies_no_update(batch):
    parts = tiny_parts()
    before = [{k: v.detach().clone() for k, v in m.named_parameters()} for m in (parts.net, parts.discriminator)]
    broken = dict(batch, image=batch["image"].clone())
    broken["image"][0, :, :4, :4] = float("nan")
    with pytest.raises(NonFiniteLossError, match=r"loss term 'g/\w+' is nan at step 7") as err:
        train_step(parts, broken, step=7)
    assert err.value.term.startswith("g/") and err.value.step == 7
    for module, saved in zip((parts.net, parts.discriminator), before):  # (spectral-norm buffers do move)
        assert all(torch.equal(v, saved[k]) for k, v in module.named_parameters())
    assert not parts.opt_g.state and not parts.opt_d.state  # no optimizer step was taken


# ---------------------------------------------------------------- checkpoints and data position


def test_checkpoint_round_trip_is_exact_and_pickle_free(tmp_path, batch):
    parts = tiny_parts()
    train_step(parts, batch)
    torch.manual_seed(123)
    save_training_state(tmp_path, parts, step=5, meta={"world_size": 1, "mlflow_run_id": "abc"})
    save_rank_state(tmp_path, 0, DataPosition(epoch=2, batches=3))
    expected_draw = (torch.rand(3), np.random.rand(), random.random())

    fresh = tiny_parts(seed=1)
    torch.manual_seed(999)
    assert restore_training_state(tmp_path, fresh) == 5
    assert restore_rank_state(tmp_path, 0) == DataPosition(epoch=2, batches=3)
    assert torch.equal(torch.rand(3), expected_draw[0]) and np.random.rand() == expected_draw[1]
    assert random.random() == expected_draw[2]
    for a, b in ((parts.net, fresh.net), (parts.discriminator, fresh.discriminator)):
        assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())
    for a, b in ((parts.opt_g, fresh.opt_g), (parts.opt_d, fresh.opt_d)):
        saved, restored = a.state_dict(), b.state_dict()
        assert saved["param_groups"] == restored["param_groups"]
        assert all(torch.equal(v, restored["state"][i][n]) for i, s in saved["state"].items() for n, v in s.items())
    assert read_meta(tmp_path)["mlflow_run_id"] == "abc" and load_state(tmp_path)["step"] == 5
    assert restore_rank_state(tmp_path, 1) is None  # a rank the checkpoint did not have


def register_checkpoints(run_dir, *steps):
    """Ray Train's snapshot of the checkpoints its controller has registered."""
    names = [{"checkpoint_dir_name": f"checkpoint_{step:08d}"} for step in steps]
    (run_dir / RAY_SNAPSHOT_FILE).write_text(json.dumps({"checkpoint_results": names}))


def test_find_checkpoint_skips_incomplete_ones(tmp_path):
    parts = tiny_parts()
    for step, complete in ((3, True), (6, True), (9, False)):
        folder = tmp_path / f"checkpoint_{step:08d}"
        folder.mkdir()
        save_training_state(folder, parts, step, {"world_size": 2})
        save_rank_state(folder, 0, DataPosition())
        if complete:
            save_rank_state(folder, 1, DataPosition())
    register_checkpoints(tmp_path, 3, 6, 9)
    assert find_checkpoint(tmp_path).name == "checkpoint_00000006"
    assert find_checkpoint(tmp_path / "checkpoint_00000003").name == "checkpoint_00000003"
    with pytest.raises(ValueError, match="incomplete"):
        find_checkpoint(tmp_path / "checkpoint_00000009")
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        find_checkpoint(tmp_path / "empty_run")
    error = RuntimeError("Worker failed\nNonFiniteLossError: loss term 'g/warp' is nan")
    message = describe_failure(error, str(tmp_path))
    assert "g/warp" in message and "checkpoint_00000006" in message


def test_find_checkpoint_in_a_run_folder_takes_only_the_ones_ray_registered(tmp_path):
    """A checkpoint Ray has copied but its controller not yet recorded (the run was stopped in between) is not the
    one a continued run restores, and its files may be partial."""
    parts = tiny_parts()
    for step in (2, 4):
        folder = tmp_path / f"checkpoint_{step:08d}"
        folder.mkdir()
        save_training_state(folder, parts, step, {"world_size": 1})
        save_rank_state(folder, 0, DataPosition())
    with pytest.raises(FileNotFoundError, match=f"named in its {RAY_SNAPSHOT_FILE}"):
        find_checkpoint(tmp_path)  # stopped before the first registration
    register_checkpoints(tmp_path, 2)
    assert find_checkpoint(tmp_path).name == "checkpoint_00000002"
    snapshot = tmp_path / RAY_SNAPSHOT_FILE
    snapshot.write_text('{"checkpoint_results": [{"checkpoint_dir')  # cut off mid-write
    with pytest.raises(ValueError, match=f"{snapshot} is not a Ray Train checkpoint snapshot"):
        find_checkpoint(tmp_path)


def test_training_batch_keeps_the_flow_of_shown_pseudo_exemplars_only(train_shards):
    """loss.flow: the loader adds the epoch's pseudo exemplar and its flow; the flow supervises only the samples
    whose y_B is that exemplar, and the copy of it is not expanded for training."""
    loader = make_loader(train_shards, batch_size=6, num_workers=0, real_exemplar_prob=0.5, with_flow=True)
    compact = next(iter(loader))
    shown = [pair == "pseudo" for pair in compact["pair"]]
    assert any(shown) and not all(shown)
    batch = training_batch(compact, 12, torch.device("cpu"))
    assert "pseudo" not in batch and "pseudo_map" not in batch
    for i, is_shown in enumerate(shown):
        assert batch["flow_valid"][i].any() == is_shown
        if is_shown:  # its y_B is the pseudo exemplar the flow points into
            assert torch.equal(compact["exemplar"][i], compact["pseudo"][i])
    plain = training_batch(next(iter(make_loader(train_shards, batch_size=6, num_workers=0))), 12, torch.device("cpu"))
    assert "flow" not in plain and plain["input_map"].shape[1] == 12


def test_batch_stream_resumes_at_the_recorded_position(train_shards, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")

    def keys(n, position):
        loader = make_loader(train_shards, batch_size=2, num_workers=0)
        stream = batch_stream(loader, position, 2)
        return [tuple(next(stream)["key"]) for _ in range(n)]

    position = DataPosition()
    first = keys(7, position)  # crosses at least one epoch boundary (rank 1 holds <= 4 full batches)
    assert position.epoch >= 1 and all(len(k) == 2 for k in first)
    resumed = keys(5, copy.copy(position))
    straight = keys(12, DataPosition())
    assert first + resumed == straight
    torch.manual_seed(0)
    state = torch.get_rng_state()
    keys(3, DataPosition())  # starting epochs must not move the training RNG
    assert torch.equal(torch.get_rng_state(), state)


# ---------------------------------------------------------------- export and grids


def test_exported_model_folder_round_trips_and_is_replaced_atomically(tmp_path, batch):
    parts = tiny_parts()
    cfg = parts.net.cfg
    out = export_model(tmp_path / "models", parts.net.state_dict(), cfg, {"mlflow_run_id": "r1"})
    export_model(out, parts.net.state_dict(), cfg, {"mlflow_run_id": "r2"})  # over an existing export
    assert json.loads((out / "run.json").read_text())["mlflow_run_id"] == "r2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]  # no temp or old folders left
    net = load_model(out)
    assert not net.training and net.cfg == cfg
    args = (batch["input_map"], batch["exemplar"], batch["exemplar_map"])
    parts.net.eval()
    with torch.no_grad():
        assert torch.equal(net(*args).image, parts.net(*args).image)
    with pytest.raises(FileNotFoundError, match="not an exported CoCosNet model"):
        read_model_files(tmp_path)


def test_sample_grid_has_one_tile_per_column(batch):
    parts = tiny_parts()
    with torch.no_grad():
        out = parts.net(batch["input_map"], batch["exemplar"], batch["exemplar_map"])
    grid = sample_grid(batch, out.image, out.warped, rows=2)
    columns = grid_columns(len(out.warped))
    assert columns[:3] == ["input", "exemplar", "warped_0"] and columns[-2:] == ["output", "target"]
    assert len(columns) == 2 + 4 + 2  # v2 warps at four levels
    assert grid.dtype == np.uint8 and grid.shape == (2 * 64 + 2, len(columns) * 66 - 2, 3)
    target_tile = grid[:64, -64:].astype(int)
    expected = ((batch["image"][0].permute(1, 2, 0) + 1) / 2 * 255).round().numpy().astype(int)
    assert np.abs(target_tile - expected).max() <= 1
