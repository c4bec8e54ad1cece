"""One full training step of CoCosNet v2 on the CPU: time and peak memory, beside the correspondence alone.

A step is what ``pipeline.train.step.train_step`` does: correspondence network + generator forward, the
generator objective (VGG19 feature matching and perceptual loss, contextual loss, hinge GAN and feature
matching through the 2-scale PatchGAN, domain alignment, cycle and warp losses), its backward and Adam
update, then the discriminator's loss, backward and update. The model is the official architecture
(``ModelConfig`` defaults: nef 32, ngf 64, ndf 64, 5 PatchMatch iterations) in its default mode with
``auto`` checkpointing, the loss weights the official ones, the VGG19 random (the cost is the same as
with trained weights), the batch one pseudo pair (the exemplar a shifted copy of the target) per sample.

``corr`` is the correspondence alone, as ``benchmarks/vs_official.py`` runs it: forward + backward of
the summed warp means. Each (section, size, batch) runs in a fresh process, ``--repeats`` times;
peak memory is the process's peak RSS (``ru_maxrss``: interpreter, weights, optimizer state, VGG
and the passes), ``setup`` the peak RSS before the first pass (what does not grow with the batch or
the image), time the median pass.

    python -m benchmarks.train_step                        # 256 and 512, batch 1: ~25 min on 2 cores
    python -m benchmarks.train_step --sizes 256 --batch 1 2 4
    python -m benchmarks.train_step --sizes 1024 --repeats 1   # the step peaks at ~21 GiB; about an hour on 2 cores
    python -m benchmarks.train_step --sizes 512 1024 --sections context --repeats 1   # the contextual loss alone
    python -m benchmarks.train_step --sizes 512 --sections step --memory-format contiguous   # NCHW, not auto
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time
import warnings
from pathlib import Path

import torch

from benchmarks import correspondence
from benchmarks.correspondence import make_inputs

REPO = Path(__file__).resolve().parents[1]


def make_batch(size: int, batch: int) -> dict[str, torch.Tensor]:
    """Pseudo pairs: the exemplar (and its map) is the target shifted by (size/32, size/16)."""
    input_map, image, _ = make_inputs(size)
    shift = dict(shifts=(size // 32, size // 16), dims=(2, 3))
    one = {"input_map": input_map, "image": image, "exemplar": torch.roll(image, **shift),
           "exemplar_map": torch.roll(input_map, **shift)}
    out = {k: v.expand(batch, -1, -1, -1).contiguous() for k, v in one.items()}
    out["is_pseudo"] = torch.ones(batch, dtype=torch.bool)
    return out


def step_case(size: int, batch: int, memory_format: str = "auto"):
    from model import ModelConfig
    from model.losses import LossWeights
    from model.vgg import load_vgg19
    from pipeline.train.step import build_parts, train_step

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the random-VGG warning: expected here
        vgg = load_vgg19("random", seed=0)
    torch.manual_seed(0)
    config = ModelConfig(image_size=(size, size), label_nc=20, memory_format=memory_format)
    parts = build_parts(config, LossWeights(), vgg, lr=1e-4, ttur=True, g_adam_eps=1e-3, amp="none",
                        device=torch.device("cpu"))
    data = make_batch(size, batch)
    return lambda: train_step(parts, data)


def corr_case(size: int, batch: int, memory_format: str = "auto"):
    from model import CoCosNet, ModelConfig

    torch.manual_seed(0)
    net = CoCosNet(ModelConfig(image_size=(size, size), label_nc=20, memory_format=memory_format)).train()
    data = make_batch(size, batch)

    def run():
        net.zero_grad(set_to_none=True)
        out = net.correspondence(data["input_map"], data["exemplar"], data["exemplar_map"])
        sum(w.mean() for w in out.warped).backward()

    return run


def context_case(size: int, batch: int, memory_format: str = "auto", whole: bool = False):
    """The contextual loss alone (the official 8 CX(r52) + 4 CX(r42) + 2 CX(pooled r32)) at the VGG19 feature
    sizes of a size x size image, forward + backward; ``whole``: in one piece, as before it was chunked."""
    from model.losses import CONTEXTUAL_CHUNK_ELEMENTS, vgg_contextual_loss

    torch.manual_seed(0)
    shapes = {"r52": (512, size // 16), "r42": (512, size // 8), "r32": (256, size // 4)}
    fake = {k: torch.randn(batch, c, s, s).relu().requires_grad_(True) for k, (c, s) in shapes.items()}
    exemplar = {k: torch.randn(batch, c, s, s).relu() for k, (c, s) in shapes.items()}
    chunk_elements = 2**62 if whole else CONTEXTUAL_CHUNK_ELEMENTS
    return lambda: vgg_contextual_loss(fake, exemplar, chunk_elements=chunk_elements).backward()


CASES = {"step": step_case, "corr": corr_case, "context": context_case,
         "context_whole": lambda size, batch, memory_format: context_case(size, batch, whole=True)}


def run_child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    run = CASES[spec["section"]](spec["size"], spec["batch"], spec["memory_format"])
    setup = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, cpu = [], []
    for _ in range(spec["repeats"]):
        start, start_cpu = time.perf_counter(), time.process_time()
        run()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"time_s": statistics.median(times), "times_s": times, "cpu_s": statistics.median(cpu),
            "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "setup_mib": setup,
            "load": os.getloadavg()[0]}


def spawn(spec: dict) -> dict:
    return correspondence.spawn(spec, "benchmarks.train_step")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--batch", type=int, nargs="+", default=[1])
    parser.add_argument("--sections", nargs="+", choices=["step", "corr", "context"], default=["step", "corr"],
                        help="context: the contextual loss alone, chunked and in one piece (the baseline)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--memory-format", choices=["auto", "contiguous", "channels_last"], default="auto",
                        help="ModelConfig.memory_format (auto: channels_last on AVX-512 CPUs)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    print(f"torch {torch.__version__}, {args.threads} threads, official widths, default mode (auto checkpointing), "
          f"memory_format {args.memory_format}, {args.repeats} passes per process; peak = whole-process peak RSS")
    if set(args.sections) - {"context"}:
        print(f"{'size':>5} {'batch':>5} | {'step s':>7} {'CPU s':>7} {'peak GiB':>8} {'setup':>6} | {'corr s':>7} "
              f"{'CPU s':>7} {'peak GiB':>8} {'setup':>6} | load")
    for size in args.sizes:
        for batch in args.batch:
            spec = {"size": size, "batch": batch, "repeats": args.repeats, "threads": args.threads,
                    "memory_format": args.memory_format}
            if "context" in args.sections:
                chunked, whole = (spawn({**spec, "section": s}) for s in ("context", "context_whole"))
                print(f"{size:>5} {batch:>5} | contextual loss, chunked: {chunked['cpu_s']:.1f} CPU s, peak "
                      f"{chunked['peak_mib'] / 1024:.2f} GiB (setup {chunked['setup_mib'] / 1024:.2f}); in one piece: "
                      f"{whole['cpu_s']:.1f} CPU s, peak {whole['peak_mib'] / 1024:.2f} GiB; one piece / chunked: "
                      f"CPU {whole['cpu_s'] / chunked['cpu_s']:.2f}x, peak above setup "
                      f"{(whole['peak_mib'] - whole['setup_mib']) / (chunked['peak_mib'] - chunked['setup_mib']):.2f}x "
                      f"| load {chunked['load']:.1f} {whole['load']:.1f}", flush=True)
            res = {s: spawn({**spec, "section": s}) for s in args.sections if s != "context"}
            if not res:
                continue
            cells = []
            for section in ("step", "corr"):
                r = res.get(section)
                cells.append(f"{r['time_s']:>7.1f} {r['cpu_s']:>7.1f} {r['peak_mib'] / 1024:>8.2f} "
                             f"{r['setup_mib'] / 1024:>6.2f}" if r else f"{'-':>7} {'-':>7} {'-':>8} {'-':>6}")
            load = " ".join(f"{r['load']:.1f}" for r in res.values())
            print(f"{size:>5} {batch:>5} | {cells[0]} | {cells[1]} | {load}", flush=True)


if __name__ == "__main__":
    main()
