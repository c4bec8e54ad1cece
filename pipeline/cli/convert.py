"""`cocosnet convert-official`: official CoCosNet-v2 checkpoints -> a model folder `translate` loads."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.common import PROG, CommandError, positive_int

NAME = "convert-official"
HELP = "convert official CoCosNet-v2 checkpoints (netCorr + netG + options) to a model folder"
DESCRIPTION = """\
Convert the released CoCosNet-v2 weights into this project's model format: a folder with
state_dict.pt, model_config.json and run.json (provenance and task), which `cocosnet translate
--model DIR`, `cocosnet info --model DIR` and pipeline.model_files.load_model read.

  cocosnet convert-official --corr checkpoints/deepfashionHD/latest_net_Corr.pth \\
      --gen checkpoints/deepfashionHD/latest_net_G.pth --opt checkpoints/deepfashionHD/opt.txt \\
      --out models/deepfashionhd-official

Only CoCosNet-v2 models (netCorr NoVGGHPM, PONO, spectral norms) convert; the converted model runs the
official forward exactly (ModelConfig.official_compat). Checkpoints are loaded with
torch.load(weights_only=True): a .pth holding anything but tensors and plain containers is refused
with the reason. opt.pkl is read by an unpickler that admits only an argparse.Namespace of plain values.
"""


def image_size(text: str) -> int:
    value = positive_int(text)
    if value % 32 or value < 64:
        raise argparse.ArgumentTypeError(f"must be a multiple of 32 and at least 64, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corr", type=Path, required=True, metavar="X_net_Corr.pth", help="official netCorr weights")
    parser.add_argument("--gen", type=Path, required=True, metavar="X_net_G.pth", help="official netG weights")
    parser.add_argument("--opt", type=Path, required=True, metavar="opt.txt|opt.pkl",
                        help="the official run's options (saved beside its checkpoints)")
    parser.add_argument("--out", type=Path, required=True, metavar="DIR",
                        help="model folder to write (replaced atomically if it is a model folder already)")
    parser.add_argument("--image-size", type=image_size, nargs=2, metavar=("H", "W"),
                        help="input size of the converted model, multiples of 32 (default: the options' crop "
                             "size, 512x512 for the released models; every layer is convolutional)")


def run(args: argparse.Namespace) -> int:
    from pipeline.data.errors import DataError
    from pipeline.official_import import convert_official

    try:
        cfg = convert_official(args.corr, args.gen, args.opt, args.out,
                               tuple(args.image_size) if args.image_size else None)
    except DataError as exc:
        raise CommandError(str(exc)) from None
    h, w = cfg.image_size
    print(f"{PROG} {NAME}: wrote {args.out} ({h}x{w}, label_nc {cfg.label_nc}, nef {cfg.nef}, ngf {cfg.ngf}); "
          f"translate with --model {args.out}")
    return 0
