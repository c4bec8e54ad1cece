"""DVC stage `shard`: data/prepared -> data/shards (WebDataset tars + manifest.json) and reports/shard_report.json.

    python -m stages.shard [--params params.yaml] [--prepared data/prepared] [--out data/shards]

The same as `cocosnet shard ...`: the stage is pipeline.data.shards.run_shard;
its arguments are in pipeline/cli/stages.py.
"""
import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["shard", *sys.argv[1:]]))
