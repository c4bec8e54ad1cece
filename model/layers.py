"""Building blocks shared by the domain adaptors and the generator (SPADE family)."""
from __future__ import annotations

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.utils import spectral_norm
from torch.nn.utils.spectral_norm import SpectralNorm
from torch.utils.checkpoint import checkpoint


def maybe_checkpoint(enabled: bool, fn, *args):
    """``fn(*args)``; when ``enabled``, its activations are recomputed in the backward pass instead of
    stored. ``fn`` must not run a spectral-normalised module: pass its ``spectral_weight`` in instead."""
    return checkpoint(fn, *args, use_reentrant=False) if enabled else fn(*args)


def spectral_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The weight a forward of the spectral-normalised ``conv`` uses, computed as that forward would
    (with one power iteration in training mode, which updates u and v in place).

    Checkpointed code takes this weight as an input instead of calling ``conv``: a recomputation
    must not iterate again (u and v would move twice per step, and another weight be used)."""
    norm = next(h for h in conv._forward_pre_hooks.values() if isinstance(h, SpectralNorm))
    return norm.compute_weight(conv, do_power_iteration=conv.training)


def conv_with(conv: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``conv`` applied to ``x`` with ``weight`` in place of its own."""
    return F.conv2d(x, weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)


def leaky_relu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, 0.2)


def memory_format_of(x: torch.Tensor) -> torch.memory_format:
    """channels_last if ``x`` (B, C, H, W) is laid out so (and not also NCHW-contiguous), else contiguous_format."""
    channels_last = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return torch.channels_last if channels_last else torch.contiguous_format


def in_layout_of(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``t`` in ``like``'s memory format (a copy only if it differs): convolutions keep their input's layout."""
    return t.contiguous(memory_format=memory_format_of(like))


def positional_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """PONO: normalise each position over channels (unbiased variance, as the official code).
    (B, C, H, W) -> (B, C, H, W)."""
    return _PositionalNorm.apply(x, eps)


class _PositionalNorm(torch.autograd.Function):
    """``(x - mean) / sqrt(var + eps)`` over dim 1 with a closed-form backward.

    Autograd through the elementwise form makes ~10 full-size passes in the backward (the mean and
    variance branches each broadcast and sum the gradient again) and keeps ``x - mean`` as well as the
    output; this makes three and keeps only the output and the (B, 1, H, W) std. Twice as fast at
    64x512x512, with the same forward.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, eps: float) -> torch.Tensor:
        std = x.var(dim=1, keepdim=True).add(eps).sqrt()
        # into a tensor of x's layout: a broadcast (B, 1, H, W) operand would make the result NCHW
        y = torch.sub(x, x.mean(dim=1, keepdim=True), out=torch.empty_like(x)).div_(std)
        ctx.save_for_backward(y, std)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        # d/dx of (x - m) / s with s^2 = sum((x - m)^2) / (C - 1) + eps:
        # (g - mean_C(g) - y * sum_C(g * y) / (C - 1)) / s
        y, std = ctx.saved_tensors
        grad_x = torch.sub(grad, grad.mean(dim=1, keepdim=True), out=torch.empty_like(y))
        grad_x.addcmul_(y, (grad * y).sum(dim=1, keepdim=True), value=-1.0 / (y.shape[1] - 1))
        return grad_x.div_(std), None


def channel_normalize(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit L2 norm over channels at every position. (B, C, H, W) -> (B, C, H, W)."""
    return x / (torch.norm(x, 2, 1, keepdim=True) + eps)


class InstanceNorm(nn.InstanceNorm2d):
    """Affine-free instance norm that keeps its input's layout.

    ``F.instance_norm`` normalises in NCHW (a channels-last input is copied), and its CPU backward pass computes
    wrong gradients when the incoming gradient is channels-last (torch 2.13), so the gradient is made NCHW
    before it. (``F.group_norm`` keeps the layout, but its statistics round differently from the official code's.)
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layout = memory_format_of(x)
        if layout == torch.contiguous_format:
            return F.instance_norm(x, eps=self.eps)
        y = F.instance_norm(x.contiguous(), eps=self.eps)
        if y.requires_grad:
            y.register_hook(lambda grad: grad.contiguous())
        return y.contiguous(memory_format=layout)


class SpectralInstanceConv(nn.Sequential):
    """Spectral-normalised convolution without bias, then affine-free instance norm.

    The bias would be cancelled by the instance norm, so it is dropped (as in SPADE's
    ``spectralinstance`` layers).
    """

    def __init__(self, in_ch: int, out_ch: int, kernel: int, stride: int = 1, padding: int = 0):
        conv = nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=padding, bias=False)
        super().__init__(spectral_norm(conv), InstanceNorm(out_ch))

    def forward(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """``weight``: the convolution's ``spectral_weight``, when computed beforehand."""
        conv, norm = self
        return norm(conv_with(conv, x, spectral_weight(conv) if weight is None else weight))


class ResidualBlock(nn.Module):
    """Reflection-padded residual block with instance norm and one shared PReLU.

    Layer indices follow the official layout (pad, conv, norm, prelu, pad, conv, norm) so that
    checkpoints map one to one; the PReLU slope is a single parameter used twice.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.relu = nn.PReLU()
        self.model = nn.Sequential(
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            InstanceNorm(channels),
            self.relu,
            nn.ReflectionPad2d(1),
            nn.Conv2d(channels, channels, 3),
            InstanceNorm(channels),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.model(x))


class SPADE(nn.Module):
    """Spatially-adaptive denormalisation: param-free norm, then per-pixel scale and shift
    predicted from a conditioning map resized (nearest) to the features.

    x: (B, C, H, W), cond: (B, C_cond, H', W') -> (B, C, H, W)
    """

    def __init__(self, channels: int, cond_channels: int, hidden: int = 128, pono: bool = True,
                 pono_eps: float = 1e-8):
        super().__init__()
        self.norm = (functools.partial(positional_norm, eps=pono_eps) if pono
                     else InstanceNorm(channels))
        self.mlp_shared = nn.Sequential(nn.ReflectionPad2d(1), nn.Conv2d(cond_channels, hidden, 3), nn.ReLU())
        self.pad = nn.ReflectionPad2d(1)
        self.mlp_gamma = nn.Conv2d(hidden, channels, 3)
        self.mlp_beta = nn.Conv2d(hidden, channels, 3)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cond = F.interpolate(cond, size=x.shape[2:], mode="nearest")
        actv = self.pad(self.mlp_shared(cond))
        return self.norm(x) * (1 + self.mlp_gamma(actv)) + self.mlp_beta(actv)


class SPADEResBlock(nn.Module):
    """SPADE residual block with spectral-normalised reflection-padded convolutions.

    x: (B, fin, H, W), cond: (B, C_cond, H', W') -> (B, fout, H, W). ``pono_eps``: 1e-8 in v2, 1e-5 in v1.
    """

    def __init__(self, fin: int, fout: int, cond_channels: int, hidden: int = 128, pono: bool = True,
                 pono_eps: float = 1e-8):
        super().__init__()
        fmid = min(fin, fout)
        self.learned_shortcut = fin != fout
        self.pad = nn.ReflectionPad2d(1)
        self.conv_0 = spectral_norm(nn.Conv2d(fin, fmid, 3))
        self.conv_1 = spectral_norm(nn.Conv2d(fmid, fout, 3))
        self.norm_0 = SPADE(fin, cond_channels, hidden, pono, pono_eps)
        self.norm_1 = SPADE(fmid, cond_channels, hidden, pono, pono_eps)
        if self.learned_shortcut:
            self.conv_s = spectral_norm(nn.Conv2d(fin, fout, 1, bias=False))
            self.norm_s = SPADE(fin, cond_channels, hidden, pono, pono_eps)

    def forward(self, x: torch.Tensor, cond: torch.Tensor, checkpointed: bool = False) -> torch.Tensor:
        """``checkpointed``: keep only the inputs of the shortcut and of each norm-activation-convolution
        branch for the backward pass, and recompute the branches there (the SPADE hidden layers, 128
        channels at the block's resolution, dominate the block's memory)."""
        shortcut = x
        if self.learned_shortcut:
            shortcut = maybe_checkpoint(checkpointed, self._branch, self.norm_s, self.conv_s,
                                        spectral_weight(self.conv_s), x, cond)
        dx = maybe_checkpoint(checkpointed, self._branch, self.norm_0, self.conv_0, spectral_weight(self.conv_0), x, cond)
        dx = maybe_checkpoint(checkpointed, self._branch, self.norm_1, self.conv_1, spectral_weight(self.conv_1), dx, cond)
        return shortcut + dx

    def _branch(self, norm: SPADE, conv: nn.Conv2d, weight: torch.Tensor, x: torch.Tensor,
                cond: torch.Tensor) -> torch.Tensor:
        """SPADE, then for the 3x3 convolutions leaky ReLU and reflection padding, then ``conv``."""
        h = norm(x, cond)
        if conv.kernel_size != (1, 1):
            h = self.pad(leaky_relu(h))
        return conv_with(conv, h, weight)


def init_xavier(module: nn.Module, gain: float = 0.02) -> None:
    """The official init: xavier-normal conv weights (gain 0.02), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            weight = m.weight_orig if hasattr(m, "weight_orig") else m.weight
            nn.init.xavier_normal_(weight.data, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias.data)
