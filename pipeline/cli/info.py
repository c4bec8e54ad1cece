"""`cocosnet info`: a model's configuration and parameter counts per module, and the data manifest."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from pipeline.cli.common import CommandError, add_model_argument

NAME = "info"
HELP = "print a model's config, its parameter counts per module, and the data manifest"
DESCRIPTION = """\
Print what a model is and what data it came from:

  model       its ModelConfig (model_config.json) and run.json (MLflow run, checkpoint, or official source)
  parameters  counts per module of the correspondence network and the generator
  data        the shard manifest: source, task, size, label_nc, samples and shards per split, skips

  cocosnet info                                   # models/ and data/shards
  cocosnet info --model models:/cocosnet@champion --json
"""
DEFAULT_SHARDS = Path("data/shards")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_argument(parser)
    parser.add_argument("--shards", type=Path, default=None,
                        help=f"shard folder whose manifest.json to show (default: {DEFAULT_SHARDS}, when it exists)")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of text")


def parameter_counts(net) -> dict[str, int]:
    """{"corr.<child>": n, ..., "corr": n, "generator.<child>": n, ..., "generator": n, "total": n}."""
    counts: dict[str, int] = {}
    for part in ("corr", "generator"):
        module = getattr(net, part)
        for name, child in module.named_children():
            counts[f"{part}.{name}"] = sum(p.numel() for p in child.parameters())
        counts[part] = sum(p.numel() for p in module.parameters())
    counts["total"] = sum(p.numel() for p in net.parameters())
    return counts


def manifest_summary(shards: Path | None) -> dict[str, Any] | None:
    """The manifest's identifying fields and per-split counts; None when the default folder has none."""
    from pipeline.data.errors import DataError
    from pipeline.data.imageio import read_json

    folder = shards or DEFAULT_SHARDS
    if shards is None and not (folder / "manifest.json").is_file():
        return None
    try:
        manifest = read_json(folder / "manifest.json")
    except DataError as exc:
        raise CommandError(str(exc)) from None
    keys = ("format", "source", "task", "image_size", "label_nc", "input_encoding", "input_channels",
            "pseudo_per_image", "fingerprint")
    summary = {k: manifest.get(k) for k in keys}
    summary["path"] = str(folder / "manifest.json")
    summary["splits"] = {split: {"images": info.get("images"), "samples": info.get("samples"),
                                 "shards": len(info.get("shards", []))}
                         for split, info in manifest.get("splits", {}).items()}
    summary["skipped"] = manifest.get("skipped", {}).get("count")
    summary["pairing"] = manifest.get("pairing")
    return summary


def run_info(model: str) -> dict[str, Any] | None:
    from pipeline.model_files import read_run_info

    try:
        return read_run_info(model) or None
    except ValueError as exc:
        return {"error": str(exc)}


def print_text(report: dict[str, Any]) -> None:
    print(f"model: {report['model']}")
    for key, value in report["config"].items():
        print(f"  {key}: {value}")
    if report["run"]:
        print("provenance (run.json):")
        for key, value in report["run"].items():
            print(f"  {key}: {value}")
    print("parameters:")
    for name, count in report["parameters"].items():
        print(f"  {name:<32}{count:>14,}")
    data = report["data"]
    if data is None:
        print(f"data: no manifest at {DEFAULT_SHARDS}/manifest.json (give --shards)")
        return
    print(f"data: {data['path']}")
    print(f"  {data['source']} {data['task']}, {data['image_size'][0]}x{data['image_size'][1]}, "
          f"label_nc {data['label_nc']} ({data['input_encoding']}), "
          f"{data['pseudo_per_image']} pseudo exemplars per image")
    for split, info in data["splits"].items():
        print(f"  {split}: {info['images']} images, {info['samples']} samples in {info['shards']} shards")
    print(f"  skipped images: {data['skipped']}; pairing: {data['pairing']}")
    print(f"  fingerprint: {data['fingerprint']}")


def run(args: argparse.Namespace) -> int:
    from pipeline.cli.common import load_translator

    net = load_translator(args.model).net
    report = {"model": args.model, "config": net.cfg.to_dict(), "run": run_info(args.model),
              "parameters": parameter_counts(net), "data": manifest_summary(args.shards)}
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print_text(report)
    return 0
