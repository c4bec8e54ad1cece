"""Reductions over gathered candidate rows that never hold all the gathered rows at once.

PatchMatch reads, for every pixel n, the rows of K candidate positions in a table and reduces them:

    dots[n, k] = <left[n], table[index[n, k]]>           (matching costs, contracted over C)
    mix[n]     = sum_k weight[n, k] * table[index[n, k]]  (warps, contracted over K)

Gathering all (N, K, C) rows first costs N*K*C floats (2 GiB for the 64 bilinear corners per pixel of a
512x512 level) and, at chunks larger than the CPU caches, runs several times slower than the reduction
itself. Here rows are gathered a cache-sized chunk at a time into one buffer reused across chunks, and
the backward pass gathers again instead of storing them. Each reduction is the other's backward with
respect to its per-pixel operand; the table's gradient is an index_add of the outer products.

All tensors are flat: left/weight (R, C)/(R, K) rows, table (T, C), index (R, K) rows of ``table``.
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

# Gathered floats per chunk (2 MiB). At 512x512 on 2 cores, 48 candidates: chunks of 0.3-1k rows took
# 0.45-0.6 s per evaluation, the former 64 MiB chunks 3.2 s (the buffer no longer stayed in cache).
CHUNK_ELEMENTS = 1 << 19


def _chunks(rows: int, k: int, c: int):
    step = max(1, CHUNK_ELEMENTS // max(1, k * c))
    for start in range(0, rows, step):
        yield start, min(rows, start + step)


def _buffer(table: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    step = max(1, CHUNK_ELEMENTS // max(1, k * table.shape[1]))
    return table.new_empty(min(rows, step) * k, table.shape[1])


def gathered_dots(left: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """left (R, C), table (T, C), index (R, K) -> (R, K) dot products. No autograd."""
    (rows, k), c = index.shape, table.shape[1]
    out = left.new_empty(rows, k)
    buf = _buffer(table, rows, k)
    for s, e in _chunks(rows, k, c):
        picked = torch.index_select(table, 0, index[s:e].reshape(-1), out=buf[: (e - s) * k]).view(e - s, k, c)
        picked.mul_(left[s:e].unsqueeze(1))
        torch.sum(picked, -1, out=out[s:e])
    return out


def gathered_mix(weight: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """weight (R, K), table (T, C), index (R, K) -> (R, C) weighted sums of the gathered rows. No autograd."""
    (rows, k), c = index.shape, table.shape[1]
    out = table.new_empty(rows, c)
    buf = _buffer(table, rows, k)
    for s, e in _chunks(rows, k, c):
        picked = torch.index_select(table, 0, index[s:e].reshape(-1), out=buf[: (e - s) * k]).view(e - s, k, c)
        picked.mul_(weight[s:e].unsqueeze(-1))
        torch.sum(picked, 1, out=out[s:e])
    return out


def scatter_outer(index: torch.Tensor, per_candidate: torch.Tensor, per_row: torch.Tensor,
                  table_rows: int) -> torch.Tensor:
    """(T, C) table gradient: sum over (n, k) of per_candidate[n, k] * per_row[n] added at row index[n, k]."""
    (rows, k), c = index.shape, per_row.shape[1]
    grad = per_row.new_zeros(table_rows, c)
    buf = _buffer(grad, rows, k)
    for s, e in _chunks(rows, k, c):
        outer = torch.mul(per_candidate[s:e].unsqueeze(-1), per_row[s:e].unsqueeze(1),
                          out=buf[: (e - s) * k].view(e - s, k, c))
        grad.index_add_(0, index[s:e].reshape(-1), outer.view(-1, c))
    return grad


class _GatherDot(torch.autograd.Function):
    @staticmethod
    def forward(ctx, left, table, index):
        ctx.save_for_backward(left, table, index)
        return gathered_dots(left, table, index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        left, table, index = ctx.saved_tensors
        grad = grad.contiguous()
        grad_left = gathered_mix(grad, table, index) if ctx.needs_input_grad[0] else None
        grad_table = scatter_outer(index, grad, left, table.shape[0]) if ctx.needs_input_grad[1] else None
        return grad_left, grad_table, None


class _GatherMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, table, index):
        ctx.save_for_backward(weight, table, index)
        return gathered_mix(weight, table, index)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        weight, table, index = ctx.saved_tensors
        grad = grad.contiguous()
        grad_weight = gathered_dots(grad, table, index) if ctx.needs_input_grad[0] else None
        grad_table = scatter_outer(index, weight, grad, table.shape[0]) if ctx.needs_input_grad[1] else None
        return grad_weight, grad_table, None


def gather_dot(left: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Differentiable ``(table[index] * left[:, None]).sum(-1)``: left (R, C), table (T, C), index (R, K) -> (R, K)."""
    return _GatherDot.apply(left.contiguous(), table.contiguous(), index.contiguous())


def gather_mix(weight: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Differentiable ``(table[index] * weight[..., None]).sum(1)``: weight (R, K), table (T, C), index (R, K) -> (R, C)."""
    return _GatherMix.apply(weight.contiguous(), table.contiguous(), index.contiguous())
