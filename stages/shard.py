"""DVC stage `shard`: data/prepared -> data/shards (WebDataset tars + manifest.json) and reports/shard_report.json.

    python -m stages.shard [--params params.yaml] [--prepared data/prepared] [--out data/shards]
"""
from __future__ import annotations

import argparse
import sys

from pipeline.data.config import DataConfig, ShardConfig
from pipeline.data.errors import DataError
from pipeline.data.shards import write_shards
from pipeline.params import load_params, section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", default="data/prepared")
    parser.add_argument("--out", default="data/shards")
    parser.add_argument("--report", default="reports/shard_report.json")
    args = parser.parse_args(argv)
    try:
        params = load_params(args.params)
        data = DataConfig.from_params(section(params, "data"))
        cfg = ShardConfig.from_params(section(params, "shard"))
        manifest = write_shards(args.prepared, args.out, cfg, seed=data.seed, report_path=args.report,
                                params={"data": section(params, "data"), "shard": section(params, "shard")})
    except DataError as exc:
        print(f"shard: error: {exc}", file=sys.stderr)
        return 1
    counts = ", ".join(f"{split}: {info['samples']} samples in {len(info['shards'])} shards"
                       for split, info in manifest["splits"].items())
    print(f"shard: {counts}; {manifest['skipped']['count']} images skipped -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
