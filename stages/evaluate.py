"""DVC stage `evaluate`: a trained model + the validation shards -> metrics/eval.json, reports/eval_*.

    python -m stages.evaluate [--params params.yaml] [--model models | models:/cocosnet@champion] [--shards ...]

Metrics (pipeline/evaluate.py) go to metrics/eval.json and, as eval/<name>, to the model's MLflow run; the PCK
curves to reports/eval_pck.csv (+ .png) and a sample grid to reports/eval_samples.png.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.data.errors import DataError
from pipeline.params import load_params


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--model", default="models", help="a model folder or an MLflow model URI (default: models)")
    parser.add_argument("--shards", default="data/shards")
    parser.add_argument("--metrics", default="metrics/eval.json")
    parser.add_argument("--reports", default="reports", help="folder for eval_pck.csv/.png and eval_samples.png")
    args = parser.parse_args(argv)
    from pipeline.evaluate import run_evaluation

    try:
        run_evaluation(load_params(args.params), model_ref=args.model, shards=args.shards,
                       metrics_path=args.metrics, reports_dir=args.reports)
    except (DataError, ValueError, FileNotFoundError) as exc:
        print(f"evaluate: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
