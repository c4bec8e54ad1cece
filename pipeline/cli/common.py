"""What every `cocosnet` subcommand shares: errors, argument types, loading a model (no heavy imports here)."""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.inference import Translator

PROG = "cocosnet"


class CommandError(Exception):
    """A failure the user can act on; main prints `cocosnet <command>: error: <message>` and exits 1."""

    exit_code = 1


class UsageError(CommandError):
    """A bad combination of arguments found after parsing; exits 2, as argparse does."""

    exit_code = 2


def report(command: str, exc: CommandError) -> int:
    """Print the error on stderr; -> its exit code."""
    kind = "usage error" if isinstance(exc, UsageError) else "error"
    hint = f" (see {PROG} {command} --help)" if isinstance(exc, UsageError) else ""
    print(f"{PROG} {command}: {kind}: {exc}{hint}", file=sys.stderr)
    return exc.exit_code


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_argument(parser: argparse.ArgumentParser, default: str = "models") -> None:
    parser.add_argument("--model", default=default, metavar="PATH|URI",
                        help="a model folder (models/, or one written by convert-official) or an MLflow model URI "
                             "such as models:/cocosnet@champion or runs:/<run id>/model; MLflow URIs use "
                             "$MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the working folder "
                             f"(default: {default})")


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"),
                        help="where the network runs (default: cpu)")


def load_translator(model: str, device: str = "cpu", task: str | None = None) -> "Translator":
    """pipeline.inference.load with its failures as CommandError naming the model."""
    from pipeline.data.errors import DataError
    from pipeline.inference import load

    try:
        return load(model, device, task)
    except (DataError, FileNotFoundError) as exc:
        raise CommandError(str(exc)) from None
    except Exception as exc:  # MLflow, a state dict that does not fit its config, ...: name the model
        raise CommandError(f"{model}: cannot load the model ({type(exc).__name__}: {exc})") from None
