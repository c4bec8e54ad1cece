"""GRU refinement of PatchMatch candidate offsets (RAFT-style update block)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class MotionEncoder(nn.Module):
    """Encode candidate probabilities and offsets.

    corr: (B, K, H, W) candidate probabilities, flow: (B, 2K, H, W) offsets (rows, then cols)
    -> (B, 64, H, W), the last 2K channels being the offsets themselves.
    """

    def __init__(self, num_candidates: int = 16, dim: int = 64):
        super().__init__()
        self.convc1 = nn.Conv2d(num_candidates, dim, 1)
        self.convc2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.convf1 = nn.Conv2d(2 * num_candidates, dim, 7, padding=3)
        self.convf2 = nn.Conv2d(dim, dim, 3, padding=1)
        self.conv = nn.Conv2d(2 * dim, dim - 2 * num_candidates, 3, padding=1)

    def forward(self, flow: torch.Tensor, corr: torch.Tensor) -> torch.Tensor:
        cor = F.relu(self.convc2(F.relu(self.convc1(corr))))
        flo = F.relu(self.convf2(F.relu(self.convf1(flow))))
        # self.conv over cat([cor, flo]) as two convolutions over its weight's halves: no concatenation
        # is built (and kept for the backward pass).
        split = cor.shape[1]
        weight = self.conv.weight
        out = F.conv2d(cor, weight[:, :split], self.conv.bias, padding=self.conv.padding)
        out = out + F.conv2d(flo, weight[:, split:], padding=self.conv.padding)
        return torch.cat([F.relu(out), flow], dim=1)


class SepConvGRU(nn.Module):
    """Convolutional GRU with a horizontal (1x5) then a vertical (5x1) pass.

    h: (B, hidden, H, W), x: (B, input, H, W) -> (B, hidden, H, W)

    The parameters keep the official layout (one convolution per gate over ``cat([h, x])``), so
    official checkpoints load as they are. The forward pass splits each gate's weight into its h
    and x columns instead: the x parts of all three gates run as one convolution and the h parts
    of z and r as another, so no concatenation is built and fewer tensors are kept for backward.
    """

    def __init__(self, hidden_dim: int = 32, input_dim: int = 64):
        super().__init__()
        dims = hidden_dim + input_dim
        self.convz1 = nn.Conv2d(dims, hidden_dim, (1, 5), padding=(0, 2))
        self.convr1 = nn.Conv2d(dims, hidden_dim, (1, 5), padding=(0, 2))
        self.convq1 = nn.Conv2d(dims, hidden_dim, (1, 5), padding=(0, 2))
        self.convz2 = nn.Conv2d(dims, hidden_dim, (5, 1), padding=(2, 0))
        self.convr2 = nn.Conv2d(dims, hidden_dim, (5, 1), padding=(2, 0))
        self.convq2 = nn.Conv2d(dims, hidden_dim, (5, 1), padding=(2, 0))

    @staticmethod
    def _step(h, x, convz, convr, convq):
        hd, pad = h.shape[1], convz.padding
        wz, wr, wq = convz.weight, convr.weight, convq.weight
        from_x = F.conv2d(x, torch.cat([wz[:, hd:], wr[:, hd:], wq[:, hd:]]),
                          torch.cat([convz.bias, convr.bias, convq.bias]), padding=pad)
        from_h = F.conv2d(h, torch.cat([wz[:, :hd], wr[:, :hd]]), padding=pad)
        xz, xr, xq = from_x.split(hd, dim=1)
        hz, hr = from_h.split(hd, dim=1)
        z = torch.sigmoid(xz + hz)
        r = torch.sigmoid(xr + hr)
        q = torch.tanh(xq + F.conv2d(r * h, wq[:, :hd], padding=pad))
        return h + z * (q - h)  # = (1 - z) * h + z * q

    def forward(self, h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        h = self._step(h, x, self.convz1, self.convr1, self.convq1)
        return self._step(h, x, self.convz2, self.convr2, self.convq2)


class FlowHead(nn.Module):
    """hidden (B, hidden, H, W) -> offset update (B, 2K, H, W): K row deltas, then K col deltas."""

    def __init__(self, input_dim: int = 32, hidden_dim: int = 64, num_candidates: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(input_dim, hidden_dim, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden_dim, 2 * num_candidates, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(F.relu(self.conv1(x)))


class UpdateBlock(nn.Module):
    """One refinement step: (hidden, corr, flow) -> (new hidden, offset delta (B, 2K, H, W))."""

    def __init__(self, num_candidates: int = 16, hidden_dim: int = 32, motion_dim: int = 64):
        super().__init__()
        self.encoder = MotionEncoder(num_candidates, motion_dim)
        self.gru = SepConvGRU(hidden_dim, motion_dim)
        self.flow_head = FlowHead(hidden_dim, 2 * hidden_dim, num_candidates)

    def forward(self, hidden, corr, flow):
        hidden = self.gru(hidden, self.encoder(flow, corr))
        return hidden, self.flow_head(hidden)
