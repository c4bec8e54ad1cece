"""`cocosnet figure`: a grid input | exemplar | warped | output from validation shards (the user guide's figure)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.common import PROG, CommandError, add_device_argument, add_model_argument, positive_int

NAME = "figure"
HELP = "save a grid input | exemplar | warped | output for a few validation pairs"
DESCRIPTION = """\
Translate the first distinct images of a shard split with their real exemplars (the retrieved or
listed exemplar of each sample) and save one PNG: a row per image, columns input | exemplar |
warped exemplar (finest level) | output, tiles upscaled to at least 192 pixels.

  cocosnet figure --model models --shards data/shards --out docs/figures/quality.png
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--shards", type=Path, default=Path("data/shards"),
                        help="shard folder with manifest.json (default: data/shards)")
    parser.add_argument("--split", default="val", help="which split to draw from (default: val)")
    parser.add_argument("--rows", type=positive_int, default=4, help="images to show (default: 4)")
    parser.add_argument("--out", type=Path, required=True, metavar="FIG.png", help="the PNG to write")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    from pipeline.cli.common import load_translator
    from pipeline.data.errors import DataError
    from pipeline.inference import figure

    translator = load_translator(args.model, args.device)
    try:
        path = figure(translator, args.shards, args.out, rows=args.rows, split=args.split)
    except (DataError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    print(f"{PROG} {NAME}: wrote {path}")
    return 0
