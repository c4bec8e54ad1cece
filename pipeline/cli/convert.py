"""`cocosnet convert-official`: official CoCosNet-v2 or v1 checkpoints -> a model folder `translate` loads."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.common import PROG, CommandError, positive_int

NAME = "convert-official"
HELP = "convert official CoCosNet-v2 or CoCosNet (v1) checkpoints (netCorr + netG + options) to a model folder"
DESCRIPTION = """\
Convert the released CoCosNet-v2 weights (--version 2, the default) or CoCosNet weights (--version 1:
ADE20k, CelebA-HQ mask and edge, DeepFashion) into this project's model format: a folder with
state_dict.pt, model_config.json and run.json (provenance and task), which `cocosnet translate
--model DIR`, `cocosnet info --model DIR` and pipeline.model_files.load_model read.

  cocosnet convert-official --corr checkpoints/deepfashionHD/latest_net_Corr.pth \\
      --gen checkpoints/deepfashionHD/latest_net_G.pth --opt checkpoints/deepfashionHD/opt.txt \\
      --out models/deepfashionhd-official
  cocosnet convert-official --version 1 --corr checkpoints/ade20k/latest_net_Corr.pth \\
      --gen checkpoints/ade20k/latest_net_G.pth --opt checkpoints/ade20k/opt.txt --out models/ade20k-v1

v2 models (netCorr NoVGGHPM, PONO, spectral norms) run the official forward exactly
(ModelConfig.official_compat); v1 models (PONO, the released options) run CoCosNet v1 as the official
code does. Checkpoints are loaded with
torch.load(weights_only=True): a .pth holding anything but tensors and plain containers is refused
with the reason. opt.pkl is read by an unpickler that admits only an argparse.Namespace of plain values.
"""


def image_size(text: str) -> int:
    value = positive_int(text)
    if value % 32 or value < 64:
        raise argparse.ArgumentTypeError(f"must be a multiple of 32 and at least 64, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--version", type=int, choices=(1, 2), default=2,
                        help="2: CoCosNet-v2 (microsoft/CoCosNet-v2, default); 1: CoCosNet (microsoft/CoCosNet)")
    parser.add_argument("--corr", type=Path, required=True, metavar="X_net_Corr.pth", help="official netCorr weights")
    parser.add_argument("--gen", type=Path, required=True, metavar="X_net_G.pth", help="official netG weights")
    parser.add_argument("--opt", type=Path, required=True, metavar="opt.txt|opt.pkl",
                        help="the official run's options (saved beside its checkpoints)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="model folder to write (replaced atomically if it is a model folder already)")
    parser.add_argument("--image-size", type=image_size, nargs=2, metavar=("H", "W"),
                        help="input size of the converted model, multiples of 32 (default: the options' crop "
                             "size: 512x512 for the released v2 models, 256x256 for v1; every layer is "
                             "convolutional)")


def run(args: argparse.Namespace) -> int:
    from pipeline.data.errors import DataError
    from pipeline.official_import import convert_official

    try:
        cfg = convert_official(args.corr, args.gen, args.opt, args.out,
                               tuple(args.image_size) if args.image_size else None, args.version)
    except DataError as exc:
        raise CommandError(str(exc)) from None
    h, w = cfg.image_size
    widths = f"nef {cfg.nef}, ngf {cfg.ngf}" if cfg.version == 2 else f"CoCosNet v1, ngf {cfg.ngf}"
    print(f"{PROG} {NAME}: wrote {args.out} ({h}x{w}, label_nc {cfg.label_nc}, {widths}); "
          f"translate with --model {args.out}")
    return 0
