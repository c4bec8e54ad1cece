"""DVC stage `prepare`: dataset source -> data/prepared (validated, resized items + retrieval descriptors).

    python -m stages.prepare [--params params.yaml] [--out data/prepared]

The same as `cocosnet prepare ...`: the stage is pipeline.data.prepare.run_prepare;
its arguments are in pipeline/cli/stages.py.
"""
import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["prepare", *sys.argv[1:]]))
