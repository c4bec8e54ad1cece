"""`cocosnet app`: the painter, exemplar retrieval and photo editing in a browser (pipeline/app)."""
from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.cli.common import PROG, CommandError, add_device_argument, add_model_argument, positive_int

NAME = "app"
HELP = "a web page to paint input maps, pick exemplars, translate and edit photos"
DESCRIPTION = """\
Serve a web page (Gradio) for one model, on 127.0.0.1 unless --host says otherwise:

  paint     the input map with the model's classes (colour legend, class names where the dataset has
            them), brush size, fill, undo, clear; or load a map file; edge models: the edges of a photo
  exemplar  retrieved from the prepared dataset by the painted map's descriptor (thumbnails), or uploaded
  translate the warped exemplar and the output side by side
  edit      a photo's own map onto the canvas, the photo as its own exemplar: repaint a region, translate

  cocosnet app                                             # models/ and data/prepared after dvc repro
  cocosnet app --model models:/cocosnet@champion --port 8080

Needs the app extra: pip install -e '.[app]' (scripts/bootstrap.sh installs it).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--data", type=Path, default=Path("data/prepared"),
                        help="prepared dataset whose images are the exemplar pool (default: data/prepared; "
                             "without it, exemplars are uploaded)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=positive_int, default=7860, help="port (default: 7860)")
    add_device_argument(parser)


def run(args: argparse.Namespace) -> int:
    from pipeline.cli.common import load_translator
    from pipeline.data.errors import DataError

    try:
        from pipeline.app import create, launch
    except ModuleNotFoundError as exc:
        if exc.name != "gradio":
            raise
        raise CommandError("the app needs Gradio: pip install -e '.[app]'") from None
    translator = load_translator(args.model, args.device)
    try:
        app = create(translator, args.data, model_ref=args.model)
        url = launch(app, args.host, args.port)
    except (DataError, ValueError) as exc:
        raise CommandError(str(exc)) from None
    except OSError as exc:  # e.g. the port is taken
        raise CommandError(f"cannot serve on {args.host}:{args.port} ({exc})") from None
    print(f"{PROG} {NAME}: {args.model} on {url} (Ctrl+C stops it)", flush=True)
    try:
        app.block_thread()
    finally:
        app.close()
    return 0
