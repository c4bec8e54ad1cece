"""The DVC stages as `cocosnet` subcommands: `cocosnet <stage> ARGS` is what `python -m stages.<stage> ARGS` runs.

Each stage is one pipeline function that reads params.yaml (pipeline.data.prepare.run_prepare,
pipeline.data.shards.run_shard, pipeline.train.launch.run_training, pipeline.evaluate.run_evaluation,
pipeline.registry.run_register); a Stage here gives it its file arguments and prints its one-line summary.
Heavy modules (torch, Ray, MLflow) load only when a stage runs.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Callable

from pipeline.cli.common import CommandError


@dataclass(frozen=True)
class Stage:
    """A DVC stage as a subcommand (the interface of the other command modules: NAME, HELP, DESCRIPTION,
    add_arguments, run). files: option -> (default, help); body(params, **files) runs it -> its summary."""

    NAME: str
    HELP: str
    DESCRIPTION: str
    files: dict[str, tuple[str, str]]
    body: Callable[..., str]

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--params", default="params.yaml", help="the pipeline settings (default: params.yaml)")
        for option, (default, text) in self.files.items():
            parser.add_argument(f"--{option}", default=default, help=f"{text} (default: {default})")

    def run(self, args: argparse.Namespace) -> int:
        from pipeline.data.errors import DataError
        from pipeline.params import load_params, validate_params

        try:
            params = load_params(args.params)
            validate_params(params)  # every section, whichever this stage reads: a bad value fails before any work
            summary = self.body(params, **{name: getattr(args, name) for name in self.files})
        except (DataError, ValueError, FileNotFoundError) as exc:
            raise CommandError(str(exc)) from None
        print(f"{self.NAME}: {summary}")
        return 0


def prepare(params: dict[str, Any], out: str) -> str:
    from pipeline.data.prepare import run_prepare

    index = run_prepare(params, out)
    summary = f"{len(index['items'])} images ready, {len(index['skipped'])} skipped"
    unmatched = index["listed_unmatched"] + index["self_unmatched"]
    if index["listed_pairs"] or index["self_pairs"] or unmatched:  # not fatal, but a list of other files shows here
        summary += (f"; pairing lists: {len(index['listed_pairs'])} listed exemplars, {len(index['self_pairs'])} "
                    f"self pairs, {unmatched} names that match no image")
    return f"{summary} -> {out}"


def shard(params: dict[str, Any], prepared: str, out: str, report: str) -> str:
    from pipeline.data.shards import run_shard

    manifest = run_shard(params, prepared, out, report)
    counts = ", ".join(f"{split}: {info['samples']} samples in {len(info['shards'])} shards"
                       for split, info in manifest["splits"].items())
    return f"{counts}; {manifest['skipped']['count']} images skipped -> {out}"


def train(params: dict[str, Any], shards: str, out: str, metrics: str, curves: str) -> str:
    from pipeline.train.launch import TrainingError, run_training

    try:
        result = run_training(params, shards=shards, models_dir=out, metrics_path=metrics, curves_path=curves)
    except TrainingError as exc:
        raise CommandError(str(exc)) from None
    return (f"step {result.metrics.get('step')} in {result.wall_s:.0f}s -> {result.model_dir} "
            f"(MLflow run {result.run_id})")


def evaluate(params: dict[str, Any], model: str, shards: str, metrics: str, reports: str) -> str:
    from pipeline.evaluate import run_evaluation

    result = run_evaluation(params, model_ref=model, shards=shards, metrics_path=metrics, reports_dir=reports)
    return f"{result.samples} validation samples -> {metrics}, {reports}/eval_*"


def register(params: dict[str, Any], model: str, eval: str, out: str) -> str:  # noqa: A002 - the option's name
    from mlflow.exceptions import MlflowException

    from pipeline.registry import run_register

    try:
        decision = run_register(params, model, eval, out)
    except MlflowException as exc:
        raise CommandError(str(exc)) from None
    name = params.get("register", {}).get("name", "cocosnet")
    verdict = "champion" if decision.promoted else "challenger (champion unchanged)"
    return f"models:/{name}/{decision.version} is {verdict}: {decision.reason}"


MODEL = ("models", "a model folder or an MLflow model URI")
STAGES = {stage.NAME: stage for stage in (
    Stage("prepare", "DVC stage: dataset source -> data/prepared (validated, resized images)",
          "DVC stage `prepare`: the data: section's source -> validated, resized items and retrieval descriptors.",
          {"out": ("data/prepared", "output folder")}, prepare),
    Stage("shard", "DVC stage: data/prepared -> data/shards (WebDataset tars + manifest.json)",
          "DVC stage `shard`: prepared items -> WebDataset tars, manifest.json and the skip report.",
          {"prepared": ("data/prepared", "prepared items"), "out": ("data/shards", "output folder"),
           "report": ("reports/shard_report.json", "skip report")}, shard),
    Stage("train", "DVC stage: data/shards -> models/ on Ray Train, tracked in MLflow",
          "DVC stage `train`: Ray Train with the model:, train: and mlflow: sections (README: 'Scaling out on a Ray "
          "cluster'); the exported model's MLflow run is recorded in models/run.json.",
          {"shards": ("data/shards", "shard folder"), "out": ("models", "exported model folder"),
           "metrics": ("metrics/train.json", "last losses and throughput"),
           "curves": ("reports/train_losses.csv", "loss curves (+ .png beside it)")}, train),
    Stage("evaluate", "DVC stage: score a model on the validation shards and log the metrics",
          "DVC stage `evaluate`: a model on the validation shards -> metrics/eval.json, the PCK curves and a sample "
          "grid, also published to the model's MLflow run.",
          {"model": MODEL, "shards": ("data/shards", "shard folder"), "metrics": ("metrics/eval.json", "metrics file"),
           "reports": ("reports", "folder of eval_pck.csv/.png and eval_samples.png")}, evaluate),
    Stage("register", "DVC stage: register the evaluated model and promote it to @champion when it wins",
          "DVC stage `register`: the model named in models/run.json -> the MLflow registry (alias challenger; "
          "champion when register.metric beats the current champion's).",
          {"model": MODEL, "eval": ("metrics/eval.json", "the evaluate stage's metrics"),
           "out": ("metrics/register.json", "the decision")}, register),
)}
