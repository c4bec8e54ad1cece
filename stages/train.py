"""DVC stage `train`: data/shards -> models/ (state dict + ModelConfig), metrics/train.json, reports/train_losses.*

    python -m stages.train [--params params.yaml] [--shards data/shards] [--out models]

Runs Ray Train with the `model:`, `train:` and `mlflow:` sections of params.yaml (see README, "Scaling out on
a Ray cluster"). Every run is tracked in MLflow; the exported model's run is recorded in models/run.json.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.data.errors import DataError
from pipeline.params import load_params
from pipeline.train.launch import TrainingError, run_training


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--shards", default="data/shards")
    parser.add_argument("--out", default="models")
    parser.add_argument("--metrics", default="metrics/train.json")
    parser.add_argument("--curves", default="reports/train_losses.csv")
    args = parser.parse_args(argv)
    try:
        run_training(load_params(args.params), shards=args.shards, models_dir=args.out, metrics_path=args.metrics,
                     curves_path=args.curves)
    except (TrainingError, DataError, ValueError, FileNotFoundError) as exc:
        print(f"train: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
