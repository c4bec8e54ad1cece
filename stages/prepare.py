"""DVC stage `prepare`: dataset source -> data/prepared (validated, resized items + retrieval descriptors).

    python -m stages.prepare [--params params.yaml] [--out data/prepared]
"""
from __future__ import annotations

import argparse
import sys

from pipeline.data.config import DataConfig
from pipeline.data.errors import DataError
from pipeline.data.prepare import prepare_dataset
from pipeline.data.sources import get_source
from pipeline.params import load_params, section


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", default="data/prepared")
    args = parser.parse_args(argv)
    try:
        cfg = DataConfig.from_params(section(load_params(args.params), "data"))
        source = get_source(cfg.source, **cfg.source_kwargs())
        index = prepare_dataset(source, args.out)
    except DataError as exc:
        print(f"prepare: error: {exc}", file=sys.stderr)
        return 1
    print(f"prepare: {len(index['items'])} images ready, {len(index['skipped'])} skipped -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
