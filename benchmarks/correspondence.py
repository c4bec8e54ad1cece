"""Correspondence benchmark: this project's correspondence against an official-style baseline.

What is compared
----------------
* ``ours``: ``model.correspondence.Correspondence`` as it is: ``PatchMatchGRU`` gathers the candidates
  of a cache-sized block of pixels at a time into one reused buffer (``model.gather``), the level-0
  attention runs through ``scaled_dot_product_attention``, and in training at >= 256 the PatchMatch
  iterations, the final read and the domain adaptors are checkpointed (``ModelConfig.checkpointing``).
* ``baseline``: the official way of computing the same thing, with the same modules and weights:
  ``LoopPatchMatchGRU`` below evaluates every candidate one at a time as the official CoCosNet-v2
  code does (``table[:, idx]`` advanced indexing on a (C, B*N) view, ``torch.sum(left * selected,
  dim=1)``, per-candidate loop for the final warp too; search under ``no_grad``, final cost with
  grad, integer (truncated) indices, one ``random.random()`` draw per iteration for the propagation
  order), level 0 materialises the (hw, hw) logits and softmaxes (``dense_global_attention``), and
  nothing is checkpointed. Before timing, the benchmark asserts that both give the same warps,
  candidates and feature gradients in ``official_compat`` mode.

Sections (forward + backward, batch 1, CPU, ``torch.set_num_threads(2)``, module in train mode;
with ``--forward``: forward only, module in eval mode under ``torch.no_grad()``, i.e. inference):
* ``search``: the correspondence search itself -- levels 0-3 (global attention with cycle at H/8,
  then PatchMatch+GRU at H/4, H/2, H) plus the theta/phi 1x1 projections, given fixed domain-adaptor
  features that are leaves requiring grad. This is where the two implementations differ.
* ``netcorr``: the whole correspondence network (both domain adaptors + search), for context.
The loss is the sum of the mean of every warp (and of the level-0 cycle warp).

How it is measured
------------------
Every (section, implementation, size) runs in a fresh child process (``OMP_WAIT_POLICY=PASSIVE``
unless set: spinning OpenMP workers made 2-thread ops up to ~6x slower on a shared 2-core CPU).
Memory: before the first forward+backward the child frees the gradients, runs ``gc`` and
``malloc_trim(0)``, resets the kernel's RSS high-water mark (``/proc/self/clear_refs``) and reads
the current RSS; the peak is ``getrusage(RUSAGE_SELF).ru_maxrss`` after the step minus that RSS,
i.e. the resident memory the step added (RSS is the honest measure for PyTorch's CPU allocator).
Time: the median of ``--repeats`` iterations after ``--warmup`` untimed ones (``--repeats-large`` /
``--warmup-large`` above 256; with no warmup the memory iteration is timed too), as wall-clock
time and as process CPU time (all threads). The CPU may be shared with other jobs: wall time then
includes waiting for a core, CPU time much less so; the 1-minute load average is printed per run.
The full netCorr is run only at ``--netcorr-sizes`` (default 256): at 512 the baseline needs ~20 GiB.

The level-0 attention: the (B, hw, hw) float32 matrices the baseline materialises are printed
computed for 64x64 and 128x128 feature maps (512 and 1024 images), and ours is measured
(forward+backward with the cycle warp) for the sizes in ``--attention-measure``.

Run from the repository root::

    python -m benchmarks.correspondence                      # search at 256 and 512, netCorr at 256
    python -m benchmarks.correspondence --sizes 256 --repeats 3
    python -m benchmarks.correspondence --mode official_compat --sections search
    python -m benchmarks.correspondence --mode official_compat --forward --sizes 512   # inference
    python -m benchmarks.correspondence --profile 512         # top ops of ours (search section)
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import random
import re
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

import model.correspondence
from model.config import ModelConfig
from model.correspondence import AttentionResult, Correspondence, global_attention
from model.layers import init_xavier
from model.patchmatch import (PatchMatchGRU, PatchMatchResult, index_to_offsets, offsets_to_positions,
                              positions_to_index)

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------
# Baseline: the official per-candidate evaluation, sharing PatchMatchGRU's modules and weights.
# ----------------------------------------------------------------------------------------------
class LoopPatchMatchGRU(PatchMatchGRU):
    """PatchMatchGRU with the official candidate evaluation: one candidate at a time.

    Features are kept as the official code keeps them: ``left`` (B, C, N) and the exemplar
    features as a (C, B*N) table read with ``table[:, idx]``. Official semantics throughout:
    truncated integer indices, random propagation order, no-grad search, final cost with grad.
    """

    @classmethod
    def like(cls, module: PatchMatchGRU) -> "LoopPatchMatchGRU":
        """A baseline with the same hyper-parameters and weights as ``module``."""
        loop = cls(module.initial_layer[0].in_channels // 2, module.num_candidates, module.iters,
                   module.temperature, official_compat=True, hidden_dim=module.initial_layer[0].out_channels)
        loop.load_state_dict(module.state_dict())
        return loop

    def _costs(self, left: torch.Tensor, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """left (B, C, N), table (C, B*N), index (B, N, M) in [0, N) -> (B, N, M) cost / temperature."""
        b, c, n = left.shape
        index = index + (torch.arange(b, device=index.device) * n).view(b, 1, 1)
        costs = []
        for i in range(index.shape[-1]):
            idx = index[:, :, i].reshape(-1)
            selected = table[:, idx].view(c, b, n).transpose(0, 1)
            costs.append(torch.sum(left * selected, dim=1, keepdim=True) / self.temperature)
        return torch.cat(costs, dim=1).transpose(1, 2)

    def _evaluate(self, left, table, offsets, layout: torch.memory_format):
        """left (B, C, N), table (C, B*N), offsets (B, 2, M, h, w) -> top-K offsets and probs (NCHW, as the
        official code; ``layout``, which ``_search`` passes on, is not used)."""
        b, _, m, h, w = offsets.shape
        index = positions_to_index(offsets_to_positions(offsets), truncate=True).flatten(2).transpose(1, 2)
        prob = F.softmax(self._costs(left, table, index), dim=-1)
        top_prob, top = torch.topk(prob, self.num_candidates, dim=-1)
        kept = torch.gather(index, -1, top).transpose(1, 2).reshape(b, -1, h, w)
        return index_to_offsets(kept), top_prob.transpose(1, 2).reshape(b, -1, h, w)

    def forward(self, left, right, exemplar, offsets, checkpointed: bool = False) -> PatchMatchResult:
        b, c, h, w = left.shape
        n = h * w
        hidden = self.initial_layer(torch.cat([left, right], dim=1))
        left_cn = left.reshape(b, c, n)
        table = right.reshape(b, c, n).transpose(0, 1).reshape(c, b * n)
        offsets = offsets.detach()
        for _ in range(self.iters):
            offsets, corr = self._search(left_cn, table, offsets, random.random() < 0.5, torch.contiguous_format)
            hidden, delta = self.refine_net(hidden, corr, offsets.flatten(1, 2))
            offsets = offsets + delta.view_as(offsets)
        with torch.no_grad():
            index = positions_to_index(offsets_to_positions(offsets), truncate=True).flatten(2).transpose(1, 2)
        prob = F.softmax(self._costs(left_cn, table, index), dim=-1)  # (B, N, K), with grad
        image_table = exemplar.reshape(b, 3, n).transpose(0, 1).reshape(3, b * n)
        flat = index + (torch.arange(b, device=index.device) * n).view(b, 1, 1)
        warp = torch.zeros(b, 3, n, dtype=exemplar.dtype, device=exemplar.device)
        for i in range(flat.shape[-1]):
            colour = image_table[:, flat[:, :, i].reshape(-1)].view(3, b, n).transpose(0, 1)
            warp = warp + colour * prob[:, :, i].unsqueeze(1)
        pos = torch.stack([torch.div(index, w, rounding_mode="floor"), index % w], dim=-1).float()  # (B, N, K, 2)
        best = torch.gather(pos, 2, prob.argmax(-1)[..., None, None].expand(-1, -1, 1, 2)).squeeze(2)
        to_map = lambda t: t.transpose(1, 2).reshape(b, 2, h, w)  # noqa: E731
        return PatchMatchResult(warp=warp.view(b, 3, h, w), best=to_map(best), first=to_map(pos[:, :, 0]),
                                index=index, prob=prob)


def dense_global_attention(query, key, exemplar, temperature: float, with_cycle: bool) -> AttentionResult:
    """Level 0 as the official code computes it: the (B, hw, hw) logits and softmax(es) in memory."""
    b, _, h, w = query.shape
    logits = torch.bmm(query.flatten(2).transpose(1, 2), key.flatten(2)) / temperature
    attn = F.softmax(logits, dim=-1)
    warp = torch.bmm(attn, exemplar.flatten(2).transpose(1, 2))  # (B, hw, 3)
    cycle = None
    if with_cycle:
        cycle = torch.bmm(F.softmax(logits.transpose(1, 2), dim=-1), warp).transpose(1, 2).reshape(b, 3, h, w)
    index = torch.topk(attn, 1, dim=-1)[1].view(b, h, w)
    best = torch.stack([torch.div(index, w, rounding_mode="floor"), index % w], dim=1).float()
    return AttentionResult(warp.transpose(1, 2).reshape(b, 3, h, w), best, cycle)


# ----------------------------------------------------------------------------------------------
# Model and inputs.
# ----------------------------------------------------------------------------------------------
class FixedFeatures(nn.Module):
    """Stands in for a domain adaptor: returns precomputed feature leaves (require grad)."""

    def __init__(self, feats: list[torch.Tensor]):
        super().__init__()
        self.feats = [f.detach().clone().requires_grad_(True) for f in feats]

    def forward(self, _x, _checkpointed=False):
        return list(self.feats)


def build(size: int, nef: int, mode: str, impl: str) -> Correspondence:
    """netCorr with deterministic official init; ``impl='baseline'`` swaps in the loop PatchMatch and
    checkpoints nothing."""
    torch.manual_seed(0)
    cfg = ModelConfig(image_size=(size, size), nef=nef, official_compat=mode == "official_compat",
                      checkpointing="none" if impl == "baseline" else "auto")
    corr = Correspondence(cfg)
    init_xavier(corr)
    if impl == "baseline":
        corr.patch_match = LoopPatchMatchGRU.like(corr.patch_match)
    return corr.train()


def make_inputs(size: int, label_nc: int = 20, channels_last_maps: bool = False
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Blocky one-hot label maps (the exemplar's is shifted) and a smooth exemplar photo.

    The maps are NCHW-contiguous, as the data loader gives them; ``channels_last_maps`` leaves them as
    ``F.one_hot(...).permute(0, 3, 1, 2)`` makes them (on CPU, oneDNN's weight gradients run ~4.5x slower
    on convolutions that inherit that layout)."""
    g = torch.Generator().manual_seed(1)
    coarse = torch.randint(0, label_nc, (1, 1, size // 16, size // 16), generator=g).float()
    labels = F.interpolate(coarse, size=(size, size), mode="nearest").long()[:, 0]
    input_map = F.one_hot(labels, label_nc).permute(0, 3, 1, 2).float()
    if not channels_last_maps:
        input_map = input_map.contiguous()
    exemplar_map = torch.roll(input_map, shifts=(size // 32, size // 16), dims=(2, 3))
    photo = torch.rand(1, 3, size // 8, size // 8, generator=g) * 2 - 1
    exemplar = F.interpolate(photo, size=(size, size), mode="bilinear", align_corners=False)
    return input_map, exemplar, exemplar_map


def noise_inputs(size: int, label_nc: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Uniform-noise maps: no two positions share a feature vector, so top-K has no exact ties
    between distinct positions (which ``torch.topk`` may break either way in either implementation)."""
    g = torch.Generator().manual_seed(5)
    return (torch.rand(1, label_nc, size, size, generator=g), torch.rand(1, 3, size, size, generator=g) * 2 - 1,
            torch.rand(1, label_nc, size, size, generator=g))


def fix_features(corr: Correspondence, inputs) -> list[torch.Tensor]:
    """Replace both adaptors by their (no-grad) outputs on ``inputs``; return the feature leaves."""
    input_map, exemplar, exemplar_map = inputs
    with torch.no_grad():
        feats_a = corr.adaptive_model_seg(input_map)
        feats_b = corr.adaptive_model_img(torch.cat([exemplar, exemplar_map], dim=1))
    corr.adaptive_model_seg = FixedFeatures(feats_a)
    corr.adaptive_model_img = FixedFeatures(feats_b)
    return corr.adaptive_model_seg.feats + corr.adaptive_model_img.feats


def warp_loss(out) -> torch.Tensor:
    loss = sum(w.mean() for w in out.warped)
    return loss + out.cycle.mean() if out.cycle is not None else loss


# ----------------------------------------------------------------------------------------------
# Equivalence check (baseline == ours in official_compat mode).
# ----------------------------------------------------------------------------------------------
def check_equivalence(size: int = 128, nef: int = 16, seed: int = 3) -> dict:
    """Same weights, inputs and propagation draws: the warps, candidates and gradients must agree."""
    results = {}
    for impl in ("ours", "baseline"):
        corr = build(size, nef, "official_compat", impl)
        inputs = noise_inputs(size)
        leaves = fix_features(corr, inputs)
        random.seed(seed)
        out = corr(*inputs)
        warp_loss(out).backward()
        results[impl] = (out, [leaf.grad for leaf in leaves], corr.patch_match.initial_layer[0].weight.grad)
    (ours, g_ours, w_ours), (base, g_base, w_base) = results["ours"], results["baseline"]
    for a, b in zip(ours.candidates, base.candidates):
        assert torch.equal(a, b), "candidate indices differ between ours and the baseline"
    max_warp = max((a - b).abs().max().item() for a, b in zip(ours.warped, base.warped))
    assert max_warp < 1e-4, f"warps differ by {max_warp}"
    max_grad = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() for a, b in zip(g_ours, g_base))
    assert max_grad < 1e-3, f"feature gradients differ (relative {max_grad})"
    assert (w_ours is None) == (w_base is None), "the GRU gets a gradient in one implementation only"
    return {"size": size, "max_warp_diff": max_warp, "max_rel_grad_diff": max_grad, "gru_grad": w_ours is not None}


# ----------------------------------------------------------------------------------------------
# Measurement (runs inside a child process).
# ----------------------------------------------------------------------------------------------
def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))


def _reset_peak() -> None:
    """Return freed heap memory to the OS, then reset the RSS high-water mark (Linux >= 4.0), so
    that ``ru_maxrss`` restarts from the memory actually in use."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(step, reset, warmup: int, repeats: int) -> dict:
    """Peak RSS delta (MiB) of the first forward+backward and median time of the timed ones.

    Iteration 0 measures memory (after ``malloc_trim`` and a high-water reset, so memory the
    allocator kept from setup is not counted as already there); it is timed only when
    ``warmup`` is 0. The others run in steady state, with whatever the allocator keeps.
    """
    times, cpu_times, peak_mib = [], [], None
    for i in range(max(1, warmup + repeats)):
        reset()
        gc.collect()
        if i == 0:
            _reset_peak()
            base = _rss_kib()
        start, start_cpu = time.perf_counter(), time.process_time()
        step()
        elapsed, cpu = time.perf_counter() - start, time.process_time() - start_cpu
        if i == 0:
            peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
        if i >= warmup:
            times.append(elapsed)
            cpu_times.append(cpu)
    return {"time_s": statistics.median(times), "cpu_s": statistics.median(cpu_times), "times_s": times,
            "peak_mib": peak_mib, "load": os.getloadavg()[0]}


def corr_case(section: str, impl: str, size: int, nef: int, mode: str, forward_only: bool = False):
    """(step, reset) for the search or the full netCorr: forward+backward in train mode, or with
    ``forward_only`` an inference forward (eval mode, no autograd)."""
    if impl == "baseline":  # this child process measures the baseline only: its level 0 is the dense one
        model.correspondence.global_attention = dense_global_attention
    corr = build(size, nef, mode, impl)
    inputs = make_inputs(size)
    leaves = fix_features(corr, inputs) if section == "search" else []

    def reset():
        corr.zero_grad(set_to_none=True)
        for leaf in leaves:
            leaf.grad = None

    def step():
        random.seed(0)
        warp_loss(corr(*inputs)).backward()

    def infer():
        random.seed(0)
        with torch.no_grad():
            corr(*inputs)

    if forward_only:
        corr.eval()
        return infer, reset
    return step, reset


def attention_case(feat: int, nef: int):
    """(step, reset) for level-0 global attention with cycle, forward+backward, at feat x feat."""
    g = torch.Generator().manual_seed(0)
    query = F.normalize(torch.randn(1, nef, feat, feat, generator=g), dim=1).requires_grad_(True)
    key = F.normalize(torch.randn(1, nef, feat, feat, generator=g), dim=1).requires_grad_(True)
    image = torch.rand(1, 3, feat, feat, generator=g)

    def reset():
        query.grad = key.grad = None

    def step():
        res = global_attention(query, key, image, 0.01, with_cycle=True)
        (res.warp.mean() + res.cycle.mean()).backward()

    return step, reset


def run_child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    if spec["section"] == "check":
        return check_equivalence(spec["size"])
    if spec["section"] == "attention":
        step, reset = attention_case(spec["size"], spec["nef"])
    else:
        step, reset = corr_case(spec["section"], spec["impl"], spec["size"], spec["nef"], spec["mode"],
                                spec.get("forward", False))
    if spec.get("profile"):
        return profile(step, reset)
    return measure(step, reset, spec["warmup"], spec["repeats"])


def profile(step, reset, rows: int = 25) -> dict:
    """Top ops (self CPU time) of one forward+backward after a warmup."""
    reset()
    step()
    reset()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return {"table": prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)}


def spawn(spec: dict, module: str = "benchmarks.correspondence") -> dict:
    """Run one measurement (`python -m <module> --child <spec>`) in a fresh interpreter and return its JSON result.

    OpenMP threads sleep instead of spinning while waiting (``OMP_WAIT_POLICY=PASSIVE`` unless set):
    on a CPU shared with other processes, spinning workers made 2-thread ops up to ~6x slower.
    """
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = subprocess.run([sys.executable, "-m", module, "--child", json.dumps(spec)],
                          cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# Reporting.
# ----------------------------------------------------------------------------------------------
def attention_bytes(feat: int, batch: int = 1) -> int:
    """Bytes of one (B, hw, hw) float32 matrix at a feat x feat feature map."""
    return batch * (feat * feat) ** 2 * 4


def fmt_mib(mib: float) -> str:
    return f"{mib / 1024:.2f} GiB" if mib >= 1024 else f"{mib:.0f} MiB"


def print_table(rows: list[dict]) -> None:
    head = (f"{'section':<8} {'size':>4} | {'wall s':>15} {'ratio':>6} | {'CPU s':>15} {'ratio':>6} | "
            f"{'peak memory':>19} {'ratio':>6}")
    print(head)
    print(f"{'':<8} {'':>4} | {'ours / base':>15} {'':>6} | {'ours / base':>15} {'':>6} | {'ours / base':>19}")
    print("-" * len(head))
    for r in rows:
        o, b = r["ours"], r["baseline"]
        cells = [f"{r['section']:<8} {r['size']:>4}"]
        for key, fmt, width in (("time_s", "{:.1f}", 7), ("cpu_s", "{:.1f}", 7), ("peak_mib", None, 9)):
            show = fmt.format if fmt else fmt_mib
            ratio = b[key] / max(o[key], 1e-9)
            cells.append(f"{show(o[key]):>{width}} {show(b[key]):>{width}} {ratio:>5.2f}x")
        print(" | ".join(cells))
    print("ratio = baseline / ours. Targets at 512 (issue 11): default mode, netcorr forward+backward: time >= 1 "
          "and memory >= 4 (ours at most a quarter of the baseline's); official_compat --forward: time >= 2")


def print_attention(measured: dict[int, dict], nef: int) -> None:
    print(f"\nLevel-0 global attention (batch 1, nef {nef}): the baseline's (B, hw, hw) float32 matrices; "
          "ours measured (flash attention, no such matrix)")
    for feat in (64, 128):
        one = attention_bytes(feat) / 2**20
        line = (f"  {feat:>3}x{feat:<3} features ({8 * feat} image): hw^2 = {(feat * feat) ** 2:>11,d} entries, "
                f"{fmt_mib(one)} per matrix, logits + softmax = {fmt_mib(2 * one)}, "
                f"+ cycle softmax (train) = {fmt_mib(3 * one)}")
        if feat in measured:
            m = measured[feat]
            line += f"; ours measured: forward+backward peak {fmt_mib(m['peak_mib'])}, {m['time_s']:.2f} s"
        print(line)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--sections", nargs="+", choices=["search", "netcorr"], default=["search", "netcorr"])
    parser.add_argument("--netcorr-sizes", type=int, nargs="*", default=[256],
                        help="sizes at which the full netCorr is run (512 needs ~20 GiB)")
    parser.add_argument("--nef", type=int, default=32)
    parser.add_argument("--mode", choices=["default", "official_compat"], default="default",
                        help="mode of ours (the baseline always has official semantics)")
    parser.add_argument("--repeats", type=int, default=3, help="timed iterations up to 256 (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed iterations first, up to 256")
    parser.add_argument("--repeats-large", type=int, default=2, help="timed iterations above 256")
    parser.add_argument("--warmup-large", type=int, default=0, help="untimed iterations first, above 256")
    parser.add_argument("--forward", action="store_true",
                        help="time inference (eval mode, no autograd) instead of forward+backward in training")
    parser.add_argument("--attention-measure", type=int, nargs="*", default=[64, 128],
                        help="feature sizes at which to measure our level-0 attention")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every child")
    parser.add_argument("--check-size", type=int, default=128, help="image size of the equivalence check")
    parser.add_argument("--profile", type=int, metavar="SIZE", help="only profile ours (search section) at SIZE")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    base_spec = {"nef": args.nef, "mode": args.mode, "threads": args.threads, "warmup": args.warmup, "repeats": 1,
                 "forward": args.forward}
    if args.profile:
        spec = dict(base_spec, section="search", impl="ours", size=args.profile, profile=True)
        print(spawn(spec)["table"])
        return

    check = spawn(dict(base_spec, section="check", size=args.check_size))
    print(f"equivalence (official_compat, {check['size']}x{check['size']}): candidates identical, "
          f"max |warp diff| {check['max_warp_diff']:.2e}, max rel. grad diff {check['max_rel_grad_diff']:.2e}, "
          f"GRU gets a gradient: {check['gru_grad']}")
    what = "inference forward (eval, no_grad)" if args.forward else "forward+backward (train mode)"
    print(f"torch {torch.__version__}, {args.threads} threads, nef {args.nef}, ours in {args.mode} mode, batch 1, "
          f"{what}; CPU shared with other jobs: timings are noisy\n")

    rows = []
    for size in args.sizes:
        small = size <= 256
        runs = {"warmup": args.warmup if small else args.warmup_large,
                "repeats": args.repeats if small else args.repeats_large}
        for section in args.sections:
            if section == "netcorr" and size not in args.netcorr_sizes:
                continue
            row = {"section": section, "size": size}
            for impl in ("ours", "baseline"):
                spec = dict(base_spec, section=section, impl=impl, size=size, **runs)
                row[impl] = spawn(spec)
                print(f"  {section} {size} {impl}: {row[impl]['time_s']:.2f} s wall, {row[impl]['cpu_s']:.2f} s CPU "
                      f"(runs {', '.join(f'{t:.2f}' for t in row[impl]['times_s'])}), "
                      f"peak {fmt_mib(row[impl]['peak_mib'])}, load {row[impl]['load']:.1f}", flush=True)
            rows.append(row)
    print()
    print_table(rows)

    measured = {feat: spawn(dict(base_spec, section="attention", impl="ours", size=feat))
                for feat in args.attention_measure}
    print_attention(measured, args.nef)


if __name__ == "__main__":
    main()
