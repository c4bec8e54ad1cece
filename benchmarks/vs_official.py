"""Side by side with the official code: the official CoCosNet-v2 netCorr and this project's default
correspondence, forward + backward of the summed warp means, each in its own process.

No official code is part of this project: pass a checkout of microsoft/CoCosNet-v2 (MIT) with
``--official``. It is run unmodified; the child process only makes ``Tensor.get_device()`` return the
tensor's device (the official PatchMatch calls ``.to(tensor.get_device())``, which is -1 on a CPU).

What runs (batch 1, CPU, ``torch.set_num_threads(--threads)``, nef 32, 20 label channels):

* official: ``NoVGGHPMCorrespondence`` built from the README's DeepFashionHD training options
  (``--PONO --PONO_C --match_kernel 1 --featEnc_kernel 3 --iteration_count 5 --temperature 0.01
  --weight_warp_cycle 1.0``, phase ``train``, so its level-0 cycle warp is computed), xavier init,
  train mode; ``--official-featpair`` also sets isTrain (its third adaptor pass and feature loss);
* ours: ``CoCosNet(ModelConfig(image_size=(S, S), label_nc=20, nef=32)).train()`` and
  ``net.correspondence(input_map, exemplar, exemplar_map)`` -- the default mode, with ``auto``
  checkpointing.

Both get the same inputs (blocky one-hot maps, NCHW-contiguous unless ``--channels-last-maps``, and a
smooth exemplar) and the loss
``sum(w.mean() for w in warps)``. Each process runs ``--repeats`` forward+backward passes and reports
their wall and CPU times and its peak RSS (``ru_maxrss``, the whole process: interpreter, weights,
inputs and the passes), which is what an out-of-memory killer sees. Ratios are official / ours.

    python -m benchmarks.vs_official --official ~/src/CoCosNet-v2                 # 512: ~15 min, ~18 GiB
    python -m benchmarks.vs_official --official ~/src/CoCosNet-v2 --rounds 3      # interleaved, drift-robust
    python -m benchmarks.vs_official --official ~/src/CoCosNet-v2 --ours-only --sizes 1024
    python -m benchmarks.vs_official --official ~/src/CoCosNet-v2 --option gru_grad_iters=1   # truncated GRU gradient
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from argparse import Namespace
from pathlib import Path

import torch

from benchmarks import correspondence
from benchmarks.correspondence import make_inputs

REPO = Path(__file__).resolve().parents[1]


def official_net(checkout: Path, featpair: bool):
    """The official netCorr with the README's DeepFashionHD options, in train mode."""
    sys.path.insert(0, str(checkout))
    torch.Tensor.get_device = lambda self: self.device  # CPU: -1 would break the official `.to(device)`
    from models.networks.correspondence import NoVGGHPMCorrespondence

    opt = Namespace(semantic_nc=20, label_nc=20, nef=32, featEnc_kernel=3, norm_E="spectralinstance",
                    norm_G="spectralspadesyncbatch3x3", PONO=True, PONO_C=True, match_kernel=1, temperature=0.01,
                    iteration_count=5, batchSize=1, isTrain=featpair, phase="train", weight_warp_cycle=1.0,
                    weight_novgg_featpair=10.0)
    torch.manual_seed(0)
    net = NoVGGHPMCorrespondence(opt)
    net.init_weights("xavier", 0.02)
    net.train()

    def step(input_map, exemplar, exemplar_map):
        out = net(exemplar, exemplar, input_map, exemplar_map)  # (ref_img, real_img, seg_map, ref_seg_map)
        loss = sum(w.mean() for w in out["warp_out"])
        return loss + out["loss_novgg_featpair"] if featpair else loss

    return net, step


def our_net(size: int, options: dict):
    from model import CoCosNet, ModelConfig

    torch.manual_seed(0)
    net = CoCosNet(ModelConfig(image_size=(size, size), label_nc=20, nef=32, **options)).train()

    def step(input_map, exemplar, exemplar_map):
        return sum(w.mean() for w in net.correspondence(input_map, exemplar, exemplar_map).warped)

    return net, step


def run_child(spec: dict) -> dict:
    torch.set_num_threads(spec["threads"])
    size = spec["size"]
    net, step = (official_net(Path(spec["official"]), spec["featpair"]) if spec["impl"] == "official"
                 else our_net(size, spec["options"]))
    inputs = make_inputs(size, channels_last_maps=spec["channels_last_maps"])
    setup_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    times, cpu = [], []
    for _ in range(spec["repeats"]):
        net.zero_grad(set_to_none=True)
        start, start_cpu = time.perf_counter(), time.process_time()
        step(*inputs).backward()
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return {"times_s": times, "cpu_s": cpu, "time_s": statistics.median(times), "cpu_median_s": statistics.median(cpu),
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "setup_rss_mib": setup_mib,
            "load": os.getloadavg()}


def spawn(spec: dict) -> dict:
    return correspondence.spawn(spec, "benchmarks.vs_official")


def describe(name: str, size: int, r: dict) -> str:
    runs = ", ".join(f"{t:.1f}" for t in r["times_s"])
    load = " ".join(f"{x:.1f}" for x in r["load"])
    return (f"{name:<8} {size:>4}: median {r['time_s']:.1f} s wall (runs {runs}), {r['cpu_median_s']:.1f} s CPU, "
            f"peak RSS {r['peak_rss_mib'] / 1024:.2f} GiB (after setup {r['setup_rss_mib'] / 1024:.2f}), load {load}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--official", type=Path, help="a checkout of microsoft/CoCosNet-v2")
    parser.add_argument("--sizes", type=int, nargs="+", default=[512])
    parser.add_argument("--repeats", type=int, default=3, help="forward+backward passes per process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="official, ours, official, ours, ...: this many pairs of processes per size; the "
                             "ratios are taken pair by pair, so a machine whose speed drifts over minutes "
                             "shows in their spread instead of biasing one side")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--official-featpair", action="store_true",
                        help="official isTrain: also its third adaptor pass and feature-pair loss")
    parser.add_argument("--ours-only", action="store_true", help="skip the official runs (e.g. at 1024)")
    parser.add_argument("--channels-last-maps", action="store_true",
                        help="feed both the one-hot maps as F.one_hot(...).permute(0, 3, 1, 2) leaves them")
    parser.add_argument("--option", action="append", default=[], metavar="FIELD=VALUE",
                        help="a ModelConfig field for ours (a JSON value), e.g. gru_grad_iters=1; repeatable")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(run_child(json.loads(args.child))))
        return
    if not args.ours_only and (args.official is None or not (args.official / "models/networks/patch_match.py").is_file()):
        parser.error("--official must point at a CoCosNet-v2 checkout (models/networks/patch_match.py), or pass --ours-only")
    options = {}
    for item in args.option:
        field, sep, value = item.partition("=")
        if not sep:
            parser.error(f"--option {item!r}: expected FIELD=VALUE")
        options[field] = json.loads(value)
    print(f"torch {torch.__version__}, {args.threads} threads, batch 1, nef 32, {args.repeats} passes per process"
          + (f"; ours with {options}" if options else "") + ("; channels-last maps" if args.channels_last_maps else ""))
    base = {"threads": args.threads, "repeats": args.repeats, "official": str(args.official),
            "featpair": args.official_featpair, "options": options, "channels_last_maps": args.channels_last_maps}
    for size in args.sizes:
        if args.ours_only:
            for _ in range(args.rounds):
                print(describe("ours", size, spawn(dict(base, impl="ours", size=size))), flush=True)
            continue
        ratios = []
        for _ in range(args.rounds):
            official = spawn(dict(base, impl="official", size=size))
            print(describe("official", size, official), flush=True)
            ours = spawn(dict(base, impl="ours", size=size))
            print(describe("ours", size, ours), flush=True)
            ratios.append(pair_ratios(official, ours))
            print("  official / ours: " + format_ratios(ratios[-1]), flush=True)
        if args.rounds > 1:
            median = {key: statistics.median(r[key] for r in ratios) for key in ratios[0]}
            spread = {key: (min(r[key] for r in ratios), max(r[key] for r in ratios)) for key in ratios[0]}
            print(f"{size}, median of {args.rounds} rounds, official / ours: " + format_ratios(median)
                  + "; range " + ", ".join(f"{key} {lo:.2f}-{hi:.2f}" for key, (lo, hi) in spread.items()), flush=True)


def pair_ratios(official: dict, ours: dict) -> dict:
    """official / ours for one pair of processes (peak: ours / official, the share of the official's)."""
    return {"time": official["time_s"] / ours["time_s"], "CPU": official["cpu_median_s"] / ours["cpu_median_s"],
            "peak share": ours["peak_rss_mib"] / official["peak_rss_mib"]}


def format_ratios(r: dict) -> str:
    return (f"time {r['time']:.2f}x, CPU {r['CPU']:.2f}x, peak RSS {1 / r['peak share']:.2f}x "
            f"(ours at {r['peak share']:.3f} of the official's)")


if __name__ == "__main__":
    main()
