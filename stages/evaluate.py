"""DVC stage `evaluate`: a trained model + the validation shards -> metrics/eval.json, reports/eval_*, and the
model's MLflow run.

    python -m stages.evaluate [--params params.yaml] [--model models | models:/cocosnet@champion] [--shards ...]

The same as `cocosnet evaluate ...`: the stage is pipeline.evaluate.run_evaluation;
its arguments are in pipeline/cli/stages.py.
"""
import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
