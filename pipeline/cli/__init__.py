"""`cocosnet`: the command line of the pipeline (console script `cocosnet = "pipeline.cli:main"`).

Subcommands live in pipeline/cli/<name>.py (NAME, HELP, DESCRIPTION, add_arguments, run); the DVC stages
are forwarded to stages.<name>.main. Heavy modules (torch, MLflow, Ray) load only inside the subcommand
that needs them, so `cocosnet --help` stays fast.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
from typing import Callable, Iterator

from pipeline.cli import app, convert, figure, info, translate
from pipeline.cli.common import PROG, CommandError, report

# The DVC stages: `cocosnet <stage> ARGS` is `python -m stages.<stage> ARGS` (the same main function).
STAGES = {
    "prepare": "dataset source -> data/prepared (validated, resized images)",
    "shard": "data/prepared -> data/shards (WebDataset tars + manifest.json)",
    "train": "data/shards -> models/ on Ray Train, tracked in MLflow",
    "evaluate": "score a model on the validation shards and log the metrics",
    "register": "register the evaluated model and promote it to @champion when it wins",
}
COMMANDS = {module.NAME: module for module in (translate, convert, info, figure, app)}
DESCRIPTION = """\
Exemplar-based image translation with CoCosNet v2: translate, import official weights, inspect models,
and run the pipeline's stages. Every subcommand has --help.

  cocosnet translate --input mask.png --exemplar photo.jpg --exemplar-map photo_mask.png --out out.png
  cocosnet translate --input maps/ --exemplar photos/ --exemplar-map photo_maps/ --out translated/
  cocosnet convert-official --corr X_net_Corr.pth --gen X_net_G.pth --opt opt.txt --out models/official
  cocosnet info --model models:/cocosnet@champion
  cocosnet app --model models                  (a web page: paint, pick exemplars, translate, edit)
  cocosnet train --params params.yaml          (the same as python -m stages.train; likewise prepare,
                                                shard, evaluate, register)

Exit codes: 0 success, 1 failure (errors on stderr name the file and the problem), 2 usage error.
"""


@contextlib.contextmanager
def _program_name(name: str) -> Iterator[None]:
    """argparse takes prog from sys.argv[0]: a stage's usage line then reads `cocosnet <stage> ...`."""
    saved = sys.argv[0] if sys.argv else ""
    if not sys.argv:
        sys.argv.append(name)
    sys.argv[0] = name
    try:
        yield
    finally:
        sys.argv[0] = saved


def run_stage(name: str, argv: list[str]) -> int:
    """Import stages.<name> (only now: stages pull in Ray, MLflow, ...) and run its main(argv)."""
    try:
        module = importlib.import_module(f"stages.{name}")
    except ModuleNotFoundError as exc:
        if exc.name != f"stages.{name}":
            raise
        return report(name, CommandError(f"stage module stages.{name} is not part of this checkout"))
    with _program_name(f"{PROG} {name}"):
        return int(module.main(argv) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        command = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
    for name, help_text in STAGES.items():  # listed here; parsed by the stage itself (see main)
        sub.add_parser(name, help=f"DVC stage: {help_text}", add_help=False)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cocosnet-pipeline")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in STAGES:
        return run_stage(argv[0], argv[1:])
    args = build_parser().parse_args(argv)
    runner: Callable[[argparse.Namespace], int] = COMMANDS[args.command].run
    try:
        return runner(args)
    except CommandError as exc:
        return report(args.command, exc)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "STAGES", "build_parser", "main"]
