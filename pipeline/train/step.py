"""One CoCosNet training step (v2 or v1): the generator step (all its loss terms), then the discriminator step.

The same function runs in a single process and in every DDP rank. Under DDP the generator (CoCosNet) and
the discriminator are wrapped separately: the generator step calls the loss with the *unwrapped*
discriminator (its parameters are frozen there, and a DDP forward without a backward would leave DDP's
reducer waiting for gradients that never come), the discriminator step with the DDP-wrapped one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from model import CoCosNet, CoCosNetOutput, ModelConfig
from model.discriminator import MultiscaleDiscriminator
from model.losses import CoCosNetLoss, LossWeights
from model.vgg import VGG19
from pipeline.train.guard import ADVICE, NonFiniteActivationError, TrainingHealthError, check_gradients, \
    diagnose_forward


class NonFiniteLossError(TrainingHealthError):
    """A loss term became NaN or Inf; no update was applied for this step."""

    def __init__(self, term: str, value: float, step: int | None = None):
        super().__init__(f"loss term {term!r}", step, f"is {value}")
        self.term, self.value = term, value


@dataclass
class TrainParts:
    """Everything one step touches. `net` and `discriminator` may be DDP wrappers."""

    net: nn.Module  # CoCosNet or DDP(CoCosNet)
    discriminator: nn.Module  # MultiscaleDiscriminator or DDP(MultiscaleDiscriminator)
    g_loss: CoCosNetLoss  # sees the unwrapped discriminator (generator step)
    d_loss: CoCosNetLoss  # sees `discriminator` as given (discriminator step)
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    scaler_g: torch.amp.GradScaler
    scaler_d: torch.amp.GradScaler
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full precision


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP (or DataParallel) wrapper."""
    return getattr(module, "module", module)


def amp_dtype_for(amp: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16/fp16 on CUDA only (CPU autocast is slower than fp32 for these convolutions)."""
    if amp == "none" or device.type != "cuda":
        return None
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def make_optimizers(net: nn.Module, discriminator: nn.Module, lr: float, ttur: bool, g_adam_eps: float,
                    generator_lr_scale: float = 1.0) -> tuple[torch.optim.Adam, torch.optim.Adam]:
    """Adam for G (CoCosNet: correspondence and image generator) and D. TTUR (the paper, official default): G at
    lr/2, D at lr*2, betas (0, 0.9). The image generator's parameters form their own group, at generator_lr_scale
    times G's rate (each group's "lr_scale", which set_rates keeps)."""
    if ttur:
        betas, g_lr, d_lr = (0.0, 0.9), lr / 2, lr * 2
    else:
        betas, g_lr, d_lr = (0.5, 0.999), lr, lr
    groups = [{"params": list(net.parameters()), "lr_scale": 1.0}]
    if generator_lr_scale != 1.0:  # one group otherwise, as before the option (checkpoints stay compatible)
        image_generator = {id(p) for p in net.generator.parameters()}
        groups = [{"params": [p for p in net.parameters() if id(p) not in image_generator], "lr_scale": 1.0},
                  {"params": list(net.generator.parameters()), "lr_scale": generator_lr_scale}]
    opt_g = torch.optim.Adam([{**g, "lr": g_lr * g["lr_scale"]} for g in groups], lr=g_lr, betas=betas,
                             eps=g_adam_eps)
    opt_d = torch.optim.Adam(discriminator.parameters(), lr=d_lr, betas=betas)
    return opt_g, opt_d


def set_rates(parts: TrainParts, g_lr: float, d_lr: float) -> None:
    """The generator's and discriminator's learning rates for the next step (TrainConfig.rates), each parameter
    group at its lr_scale times that."""
    for optimizer, lr in ((parts.opt_g, g_lr), (parts.opt_d, d_lr)):
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)


def build_parts(model_cfg: ModelConfig, weights: LossWeights, vgg: VGG19, *, lr: float, ttur: bool,
                g_adam_eps: float, amp: str, device: torch.device, wrap=lambda module: module,
                generator_lr_scale: float = 1.0, class_channels: tuple[int, int] | None = None) -> TrainParts:
    """Networks, losses, optimizers and scalers on `device`. `wrap` turns a module into its DDP version
    (ray.train.torch.prepare_model); the optimizers see the same parameters either way. class_channels: the
    shards' (manifest), for loss.class_nce."""
    if weights.class_nce and model_cfg.version != 2:
        raise ValueError("loss.class_nce needs model.version 2 (v1 has loss.mask with model.warp_mask)")
    net = CoCosNet(model_cfg).to(device).train()
    discriminator = MultiscaleDiscriminator(model_cfg).to(device).train()
    vgg = vgg.to(device)
    wrapped_net, wrapped_d = wrap(net), wrap(discriminator)
    opt_g, opt_d = make_optimizers(net, discriminator, lr, ttur, g_adam_eps, generator_lr_scale)
    amp_dtype = amp_dtype_for(amp, device)
    # Loss scaling only for fp16 (bf16 has fp32's range). One scaler per optimizer: an overflow in one
    # step must not skip or rescale the other network's update.
    use_scaler = amp_dtype == torch.float16
    finest_warp_only = model_cfg.version == 1  # v1 supervises its full-resolution warp, v2 every level
    return TrainParts(net=wrapped_net, discriminator=wrapped_d,
                      g_loss=CoCosNetLoss(weights, vgg, discriminator, finest_warp_only, model_cfg.temperature,
                                          class_channels),
                      d_loss=CoCosNetLoss(weights, vgg, wrapped_d, finest_warp_only, model_cfg.temperature,
                                          class_channels),
                      opt_g=opt_g, opt_d=opt_d,
                      scaler_g=torch.amp.GradScaler(device.type, enabled=use_scaler),
                      scaler_d=torch.amp.GradScaler(device.type, enabled=use_scaler),
                      device=device, amp_dtype=amp_dtype)


def _autocast(parts: TrainParts):
    if parts.amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=parts.device.type, dtype=parts.amp_dtype)


def _checked_values(terms: Mapping[str, torch.Tensor], prefix: str, step: int | None) -> dict[str, float]:
    """Loss terms as floats, the mean over DDP ranks (one device sync for all), so that every rank takes the same
    decision; NonFiniteLossError names the first bad term."""
    names = [f"{prefix}/{name}" for name in terms] + [f"{prefix}/total"]
    stacked = torch.stack([v.detach().float().reshape(()) for v in terms.values()] or [torch.zeros(())])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(stacked)
        stacked /= dist.get_world_size()
    values = stacked.tolist()[: len(terms)]
    values.append(sum(values))
    for name, value in zip(names, values):
        if value != value or value in (float("inf"), float("-inf")):
            raise NonFiniteLossError(name, value, step)
    return dict(zip(names, values))


def _update(total: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, module: nn.Module,
            label: str, step: int | None) -> None:
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(total).backward()
    if not scaler.is_enabled():  # fp16 loss scaling skips a step whose gradients overflow: normal, not a failure
        check_gradients(unwrap(module), label, step)  # DDP has averaged them: every rank decides alike
    scaler.step(optimizer)
    scaler.update()


def _generate(parts: TrainParts, batch: Mapping[str, torch.Tensor], step: int | None) -> CoCosNetOutput:
    """The generator's forward pass; when it fails on non-finite values (e.g. NaN indices inside PatchMatch after
    a diverged update) NonFiniteActivationError names the first layer whose output is not finite."""
    inputs = (batch["input_map"], batch["exemplar"], batch["exemplar_map"])
    try:
        return parts.net(*inputs, target=batch["image"])
    except Exception as err:
        layer = diagnose_forward(unwrap(parts.net), *inputs, target=batch["image"])
        if layer is None:
            raise
        raise NonFiniteActivationError(f"the output of net.{layer}", step, "holds NaN or Inf values", ADVICE) from err


def train_step(parts: TrainParts, batch: Mapping[str, torch.Tensor],
               step: int | None = None) -> tuple[dict[str, float], CoCosNetOutput]:
    """G step then D step on one batch of model tensors on parts.device (pipeline.data.loader.to_model).

    Pseudo pairs (batch["is_pseudo"]) carry the pixel-level terms (VGG feature matching, warp-to-target)
    and real-exemplar pairs do not: the loss weights each sample by is_pseudo, as in the paper.
    -> ({"g/<term>": float, ..., "g/total", "d/d_fake", "d/d_real", "d/total"}, generator output).
    Raises NonFiniteLossError before any update when a term is NaN/Inf, NonFiniteGradientError before an update
    whose gradients are NaN/Inf (without fp16 loss scaling), NonFiniteActivationError when the forward fails on
    non-finite values: all TrainingHealthError.
    """
    with _autocast(parts):
        out = _generate(parts, batch, step)
        g_total, g_terms = parts.g_loss.generator_loss(batch, out)
    losses = _checked_values(g_terms, "g", step)
    _update(g_total, parts.opt_g, parts.scaler_g, parts.net, "net", step)

    with _autocast(parts):
        d_total, d_terms = parts.d_loss.discriminator_loss(batch, out.image.detach())
    losses |= _checked_values(d_terms, "d", step)
    if d_terms:  # no terms when the GAN weight is 0: nothing to train the discriminator on
        _update(d_total, parts.opt_d, parts.scaler_d, parts.discriminator, "discriminator", step)
    return losses, out
