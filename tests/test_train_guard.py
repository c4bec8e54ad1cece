"""The guards that keep a broken state out of checkpoints and exports (pipeline/train/guard.py), on the issue's
probes: a loss weight of 1e38 (every gradient is finite, their global norm overflows), lr 1e30 (the next forward
overflows inside PatchMatch), lr 1e6 (finite weights around 5e5: the loss diverges), and a NaN weight in a Ray run."""
from __future__ import annotations

import shutil

import pytest
import torch

from pipeline.data.loader import make_loader, to_model
from pipeline.model_files import write_model_files
from pipeline.train.guard import (DivergenceError, DivergenceGuard, NonFiniteActivationError, NonFiniteGradientError,
                                  NonFiniteStateError, TrainingHealthError, check_gradients, check_state)
from pipeline.train.step import train_step
from tests.test_train_step import tiny_parts

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROBE_LOSS = {"vgg": 0.0, "perceptual": 0.0, "pixel": 100.0, "gan": 1.0, "gan_feat": 1.0}  # params.yaml's


@pytest.fixture(scope="module")
def batches(train_shards):
    loader = make_loader(train_shards, batch_size=2, num_workers=0, real_exemplar_prob=0.2)
    return [to_model(b, 12) for b, _ in zip(loader, range(3))]


def parameters(parts) -> list[torch.Tensor]:
    return [p.detach().clone() for m in (parts.net, parts.discriminator) for p in m.parameters()]


def test_a_huge_loss_weight_stops_at_the_overflowing_gradient_before_any_update(batches):
    parts = tiny_parts(loss={**PROBE_LOSS, "pixel": 1e38}, lr=2e-3)
    before = parameters(parts)
    with pytest.raises(NonFiniteGradientError, match=r"gradient norm of net overflows \(inf\) at step 1") as err:
        train_step(parts, batches[0], step=1)
    assert err.value.step == 1 and "lower train.lr or the loss weights" in str(err.value)
    assert all(torch.equal(a, b) for a, b in zip(before, parameters(parts))) and not parts.opt_g.state


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_is_named(bad):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net(torch.ones(1, 3)).sum().backward()
    check_gradients(net, "net", step=7)  # finite: passes
    net[1].bias.grad[1] = bad
    with pytest.raises(NonFiniteGradientError, match=r"gradient of net\.1\.bias holds NaN or Inf values at step 7"):
        check_gradients(net, "net", step=7)


def test_lr_1e30_stops_at_the_first_layer_whose_output_overflows(batches):
    parts = tiny_parts(loss=PROBE_LOSS, lr=1e30)
    train_step(parts, batches[0], step=1)  # finite gradients; the update makes the weights ~5e29
    with pytest.raises(TrainingHealthError, match="at step 2") as err:
        train_step(parts, batches[1], step=2)  # unguarded: IndexError inside PatchMatch (NaN indices)
    assert isinstance(err.value, NonFiniteActivationError) and err.value.term.startswith("the output of net.")
    assert isinstance(err.value.__cause__, IndexError)


def test_lr_1e6_diverges_and_the_guard_names_the_loss_and_the_step(batches):
    parts = tiny_parts(loss=PROBE_LOSS, lr=1e6)
    guard = DivergenceGuard(factor=20.0, warmup=1)
    losses, _ = train_step(parts, batches[0], step=1)
    guard.check(losses, 1)
    losses, _ = train_step(parts, batches[1], step=2)  # finite, but G's and D's losses jump by ~1e5
    with pytest.raises(DivergenceError, match=r"[gd]/total is \S+, \S+ x its running median .* at step 2"):
        guard.check(losses, 2)


def test_the_divergence_guard_lets_noise_pass_waits_for_its_warmup_and_can_be_off():
    guard = DivergenceGuard(factor=10.0, warmup=3)
    for step, loss in enumerate([50.0, 400.0, 40.0, 60.0, 30.0, 0.2, 80.0, 45.0], 1):  # 400: within the warm-up
        guard.check({"g/total": loss, "d/total": 0.01 * step}, step)  # D near 0: the floor of 1 keeps it quiet
    with pytest.raises(DivergenceError, match="g/total is -2000"):
        guard.check({"g/total": -2000.0}, 9)  # hinge GAN losses can be negative: magnitudes count
    off = DivergenceGuard(factor=None, warmup=1)
    for step, loss in enumerate([1.0, 1e9], 1):
        off.check({"g/total": loss}, step)


def test_skipped_steps_of_fp16_loss_scaling_are_not_failures(batches):
    parts = tiny_parts(loss=PROBE_LOSS, lr=2e-3)
    parts.scaler_g = torch.amp.GradScaler("cpu", init_scale=2.0**127)  # the scaled loss overflows: a skipped step
    before = [p.detach().clone() for p in parts.net.parameters()]
    train_step(parts, batches[0], step=1)
    assert all(torch.equal(a, b) for a, b in zip(before, parts.net.parameters()))  # skipped, not applied
    assert parts.scaler_g.get_scale() < 2.0**127  # and the scale backed off


def test_a_non_finite_parameter_or_optimizer_state_is_named_before_a_checkpoint_or_export(batches, tmp_path):
    parts = tiny_parts(loss=PROBE_LOSS, lr=2e-3)
    train_step(parts, batches[0], step=1)
    check_state(parts, 1)
    name, param = next(iter(parts.discriminator.named_parameters()))
    parts.opt_d.state[param]["exp_avg_sq"].view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteStateError, match=f"optimizer state exp_avg_sq of discriminator.{name} .* step 1"):
        check_state(parts, 1)
    parts.opt_d.state[param]["exp_avg_sq"].zero_()
    with torch.no_grad():
        next(parts.net.parameters()).view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteStateError, match=r"net\.\S+ holds NaN or Inf values at step 1"):
        check_state(parts, 1)
    with pytest.raises(ValueError, match="refusing to write a model whose .* holds NaN"):
        write_model_files(tmp_path / "model", parts.net.state_dict(), parts.net.cfg)
    assert not (tmp_path / "model").exists()


def test_the_driver_refuses_a_corrupt_shard_before_it_starts_ray(train_shards, tmp_path):
    from pipeline.data.errors import DataError
    from pipeline.train.launch import resolve

    shards = tmp_path / "shards"
    shutil.copytree(train_shards, shards)
    victim = sorted(shards.glob("train-*.tar"))[1]
    data = bytearray(victim.read_bytes())
    data[700] ^= 0x01
    victim.write_bytes(bytes(data))
    params = {"model": {}, "train": {"verify_shards": "size"}}
    resolve(params, shards, tmp_path)  # same size: only the hash tells
    with pytest.raises(DataError, match=f"{victim}: sha256 .* differs from the manifest's"):
        resolve({"model": {}, "train": {}}, shards, tmp_path)
