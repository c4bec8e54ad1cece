"""Work around a oneMKL race that makes a process's first float unary op silently imprecise on the CPU.

ATen computes contiguous float unary ops (sqrt, exp, log, tanh, ...) with MKL's VML, each intra-op thread on its
own chunk. The oneMKL bundled with the torch wheels picks each VML function's kernel on that function's first call;
when the first call runs on several threads at once, one thread can run a low-accuracy kernel for its whole chunk
(up to ~4000 ulp): pytorch/pytorch#188792, whose proposed fix (#188791) is this warm-up; still seen with torch 2.13.
Here it showed as the official parity tests failing in ~40% of fresh processes: the first ``sqrt`` of positional
norm (4096 elements, two threads) came back with 3e-4 relative error on the second thread's half, which moved the
level-0 warp by 1.7e-3. Later calls are exact, so only a process's first forward pass is at risk.
"""
from __future__ import annotations

import torch

# The ops that aten/src/ATen/cpu/vml.h routes to MKL (a few more cost nothing: one element each).
VML_OPS = ("acos", "asin", "atan", "cos", "cosh", "erf", "erfc", "erfinv", "exp", "expm1", "lgamma", "log", "log10",
           "log1p", "log2", "rsqrt", "sigmoid", "sin", "sinh", "sqrt", "tan", "tanh")


def settle_vml_dispatch() -> None:
    """Call each VML op once on a single element (one thread), so that MKL picks its kernels before any parallel
    call. Call it in a process before the model's first CPU forward pass; calling it again is harmless."""
    for dtype in (torch.float32, torch.float64):
        one = torch.full((1,), 0.5, dtype=dtype)
        for op in VML_OPS:
            getattr(torch, op)(one)
