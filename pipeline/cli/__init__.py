"""`cocosnet`: the command line of the pipeline (console script `cocosnet = "pipeline.cli:main"`).

Subcommands live in pipeline/cli/<name>.py (NAME, HELP, DESCRIPTION, add_arguments, run); the DVC stages
are pipeline/cli/stages.py (`python -m stages.<stage>` runs `cocosnet <stage>`). Heavy modules (torch, MLflow,
Ray) load only inside the subcommand that needs them, so `cocosnet --help` stays fast.
"""
from __future__ import annotations

import argparse
import sys
from typing import Callable

from pipeline.cli import app, convert, figure, info, translate
from pipeline.cli.common import PROG, CommandError, report
from pipeline.cli.stages import STAGES

COMMANDS = {module.NAME: module for module in (translate, convert, info, figure, app)}
SUBCOMMANDS = {**COMMANDS, **STAGES}
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=module.HELP, description=module.DESCRIPTION,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(command)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cocosnet-pipeline")
    except PackageNotFoundError:
        return "(not installed)"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    runner: Callable[[argparse.Namespace], int] = SUBCOMMANDS[args.command].run
    try:
        return runner(args)
    except CommandError as exc:
        return report(args.command, exc)
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130


__all__ = ["COMMANDS", "STAGES", "build_parser", "main"]
