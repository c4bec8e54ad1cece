"""How long one translation takes on this CPU, as the app and the REST endpoint make it.

Rows per image size and model configuration (random weights: the time does not depend on them):

    translate   Translator.prepare + run on arrays (what `cocosnet app` does per click, batch 1)
    request     serving.translate_request on a record of base64 PNG/JPEG files (what `mlflow models serve`
                does per request, without HTTP): decoding, temporary files, PNG encoding of image and warp

Configurations: `default` is params.yaml's model: section (the default `dvc repro` model), `official` the
CoCosNet-v2 DeepFashionHD network (nef 32, ngf 64, spade_hidden 128, 5 PatchMatch iterations, temperature 0.01).
Median wall-clock and process CPU seconds over --repeats after one warm-up; ratios (request / translate, each
size / the smallest) are of CPU seconds, which other jobs on a shared machine disturb less than wall-clock.

    python -m benchmarks.translate                              # 64 and 256, both configurations: ~1-2 min
    python -m benchmarks.translate --sizes 64 256 512 --configs official
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import pandas as pd
import torch
import yaml

from model import CoCosNet, ModelConfig
from pipeline.data.sources import get_source
from pipeline.inference import Translator
from pipeline.serving import encode_png, translate_request

OFFICIAL = {"nef": 32, "ngf": 64, "spade_hidden": 128, "patchmatch_iters": 5, "temperature": 0.01}
MODEL_KEYS = ("correspondence", "nef", "ngf", "spade_hidden", "patchmatch_iters", "temperature")


def config(name: str, size: int, label_nc: int = 12) -> ModelConfig:
    with open("params.yaml") as f:
        model = yaml.safe_load(f)["model"]
    values = {k: model[k] for k in MODEL_KEYS if k in model}
    if name == "official":
        values.update(OFFICIAL)
    return ModelConfig.from_dict({**values, "image_size": [size, size], "label_nc": label_nc})


def timed(fn, repeats: int) -> tuple[float, float]:
    """-> median (wall, CPU) seconds of fn() after one warm-up call."""
    fn()
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return statistics.median(walls), statistics.median(cpus)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--configs", nargs="+", default=["default", "official"], choices=["default", "official"])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"{'config':9} {'size':>5} {'row':10} {'wall s':>8} {'cpu s':>8}  ratios")
    for name in args.configs:
        base = None
        for size in args.sizes:
            source = get_source("synthetic", task="mask", image_size=(size, size), label_nc=12, seed=1, num_images=2)
            a, b = (source.load(item) for item in source.items())
            translator = Translator(CoCosNet(config(name, size)))
            record = pd.DataFrame([{"input_map": encode_png(a.input_map), "exemplar": encode_png(b.photo),
                                    "exemplar_map": encode_png(b.input_map)}])
            plain = timed(lambda: translator.run([translator.prepare(a.input_map, b.photo, b.input_map)]),
                          args.repeats)
            request = timed(lambda: translate_request(translator, record), args.repeats)
            base = base or plain[1]
            print(f"{name:9} {size:5d} {'translate':10} {plain[0]:8.3f} {plain[1]:8.3f}  x{plain[1] / base:.1f} "
                  f"vs size {args.sizes[0]}")
            print(f"{name:9} {size:5d} {'request':10} {request[0]:8.3f} {request[1]:8.3f}  "
                  f"request/translate {request[1] / plain[1]:.2f}")


if __name__ == "__main__":
    main()
