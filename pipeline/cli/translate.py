"""`cocosnet translate`: one pair, two folders matched by file stem, or a CSV of pairs, in batches."""
from __future__ import annotations

import argparse
import csv
import io
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

from pipeline.cli.common import (PROG, CommandError, UsageError, add_device_argument, add_model_argument,
                                 load_translator, positive_int)

if TYPE_CHECKING:
    from pipeline.inference import Translation, Translator

NAME = "translate"
HELP = "translate input maps in the style of exemplar photos"
DESCRIPTION = """\
Translate input-domain maps (segmentation mask, edge map, pose) into photos in the style of exemplars.

  one pair:   cocosnet translate --input MAP --exemplar PHOTO [--exemplar-map MAP] --out OUT.png
  folders:    cocosnet translate --input DIR --exemplar DIR|PHOTO [--exemplar-map DIR|MAP] --out DIR
              (pairs match by file stem: maps/a.png + photos/a.jpg -> DIR/a.png)
  CSV:        cocosnet translate --pairs pairs.csv --out DIR
              (header input,exemplar[,exemplar_map][,out]; paths relative to the CSV, out relative to DIR)

Inputs (--task auto decides per file):
  mask   index PNG (mode L, P or I;16) of class ids < the model's label_nc
  edge   grey image, white edges on black; without --exemplar-map the exemplar's map is its Canny edges
  pose   OpenPose keypoints: <name>_candidate.txt with <name>_subset.txt beside it, or an OpenPose .json
         (COCO-18 or BODY_25), drawn on a canvas of the exemplar photo's size unless --pose-canvas is given
  any    a .npy array (C, H, W) of the map's own channels (uint8 0-255 or float 0-1)

Sizes (aspect policy): every image is scaled to cover the model's size and centre-cropped to it; for a
square model the shorter side is resized to the model's size and the centre is cut out. Photos are
filtered (area or bilinear), maps use nearest neighbour, so class ids and edges stay exact. Outputs are
at the model's size (`cocosnet info` shows it) and are written atomically (a temporary file, renamed).

In folder and CSV mode a pair that fails is reported on stderr and the others go on; the exit code is 1
when any pair failed. Exit codes: 0 all written, 1 a failure, 2 a usage error.
"""
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP"}
KEY_SUFFIXES = ("_candidate", "_keypoints")  # OpenPose file names: <name>_candidate.txt, <name>_keypoints.json
COMPANION_SUFFIX = "_subset.txt"  # read with its _candidate.txt, never an input of its own
CSV_COLUMNS = ("input", "exemplar", "exemplar_map", "out")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_argument_group("what to translate")
    source.add_argument("--input", type=Path, metavar="MAP|DIR", help="input map file, or a folder of them")
    source.add_argument("--exemplar", type=Path, metavar="PHOTO|DIR",
                        help="exemplar photo, or a folder of photos matched to the inputs by file stem")
    source.add_argument("--exemplar-map", type=Path, metavar="MAP|DIR",
                        help="the exemplar's own map (file, or folder matched by stem); mask and pose models need it")
    source.add_argument("--pairs", type=Path, metavar="CSV", help="a CSV of pairs instead of --input/--exemplar")
    parser.add_argument("--out", type=Path, required=True, metavar="OUT|DIR",
                        help="output image (.png, .jpg, .webp) for one pair; the output folder otherwise")
    add_model_argument(parser)
    parser.add_argument("--task", default="auto", choices=("auto", "mask", "edge", "pose"),
                        help="input domain; auto: pose for OpenPose files, else the task recorded with the model, "
                             "else edge for 1-channel models and mask otherwise (default: auto)")
    parser.add_argument("--pose-canvas", type=positive_int, nargs=2, metavar=("H", "W"),
                        help="size of the image the input keypoints were detected on (default: the exemplar's size)")
    parser.add_argument("--save-warped", action="store_true",
                        help="also write the warped exemplar of every level as <out stem>_warped_l<level>.png "
                             "(level 0 = coarsest, at its own resolution)")
    parser.add_argument("--batch-size", type=positive_int, default=8, help="pairs per forward pass (default: 8)")
    add_device_argument(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------- pairs


@dataclass
class Pair:
    """One translation to make. problem: why it cannot be made, found before reading any file."""

    input: Path
    exemplar: Path | None
    exemplar_map: Path | None
    out: Path
    problem: str | None = None


def pair_key(path: Path) -> str:
    """The stem that matches files across folders: a.png, a.jpg, a_candidate.txt, a_keypoints.json -> a."""
    stem = path.name[: -len(path.suffix)] if path.suffix else path.name
    for suffix in KEY_SUFFIXES:
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return stem[: -len(suffix)]
    return stem


def folder_files(folder: Path) -> list[Path]:
    """Candidate inputs of a folder: visible files, sorted, without OpenPose _subset.txt companions."""
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and not p.name.endswith(COMPANION_SUFFIX))


def index_by_key(folder: Path, suffixes: Sequence[str] | None = None) -> dict[str, list[Path]]:
    index: dict[str, list[Path]] = {}
    for path in folder_files(folder):
        if suffixes is None or path.suffix.lower() in suffixes:
            index.setdefault(pair_key(path), []).append(path)
    return index


def match(key: str, given: Path | None, index: dict[str, list[Path]] | None,
          what: str) -> tuple[Path | None, str | None]:
    """The file for `key`: `given` itself when it is a file, else the one file of that stem in its folder."""
    if given is None or index is None:
        return given, None
    found = index.get(key, [])
    if len(found) == 1:
        return found[0], None
    if not found:
        return None, f"no {what} named {key}.* in {given}"
    return None, f"several {what}s named {key}.* in {given}: {', '.join(p.name for p in found)}"


def pairs_from_folder(inputs: Path, exemplar: Path, exemplar_map: Path | None, out_dir: Path) -> list[Pair]:
    from pipeline.data.sources.base import PHOTO_SUFFIXES

    photos = index_by_key(exemplar, PHOTO_SUFFIXES) if exemplar.is_dir() else None
    maps = index_by_key(exemplar_map) if exemplar_map is not None and exemplar_map.is_dir() else None
    pairs = []
    for path in folder_files(inputs):
        key = pair_key(path)
        photo, problem = match(key, exemplar, photos, "exemplar photo")
        y_map, map_problem = match(key, exemplar_map, maps, "exemplar map")
        problem = problem or map_problem
        pairs.append(Pair(path, photo, y_map, out_dir / f"{key}.png", f"{path}: {problem}" if problem else None))
    if not pairs:
        raise CommandError(f"{inputs}: no input files in the folder")
    return pairs


def pairs_from_csv(table: Path, out_dir: Path) -> list[Pair]:
    """Rows of input,exemplar[,exemplar_map][,out]; paths are relative to the CSV's folder, out to out_dir."""
    try:
        with table.open(newline="") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            rows = list(reader)
    except FileNotFoundError:
        raise CommandError(f"{table}: file not found") from None
    except (UnicodeDecodeError, csv.Error) as exc:
        raise CommandError(f"{table}: not a readable CSV ({exc})") from None
    unknown = sorted(set(columns) - set(CSV_COLUMNS))
    if "input" not in columns or "exemplar" not in columns or unknown:
        raise CommandError(f"{table}: the header must name input,exemplar and optionally exemplar_map,out; "
                           f"got {columns}" + (f" (unknown {unknown})" if unknown else ""))
    base, pairs = table.parent, []
    for line, row in enumerate(rows, start=2):
        cells = {k.strip(): (v or "").strip() for k, v in row.items() if k is not None}
        paths = {name: base / cells[name] if cells.get(name) else None
                 for name in ("input", "exemplar", "exemplar_map")}
        out = out_dir / (cells.get("out") or f"{pair_key(Path(cells.get('input') or f'row{line}'))}.png")
        missing = [name for name in ("input", "exemplar") if paths[name] is None]
        problem = f"{table}:{line}: empty {' and '.join(missing)}" if missing else None
        pairs.append(Pair(paths["input"] or table, paths["exemplar"], paths["exemplar_map"], out, problem))
    if not pairs:
        raise CommandError(f"{table}: no pairs listed")
    return pairs


def check_outputs(pairs: list[Pair]) -> None:
    """Mark pairs whose output has an unknown format or was already claimed by an earlier pair."""
    claimed: dict[Path, Path] = {}
    for pair in pairs:
        if pair.problem:
            continue
        if pair.out.suffix.lower() not in OUTPUT_FORMATS:
            pair.problem = f"{pair.out}: unknown output format (use {', '.join(OUTPUT_FORMATS)})"
        elif pair.out.resolve() in claimed:
            pair.problem = f"{pair.input}: output {pair.out} is also the output of {claimed[pair.out.resolve()]}"
        else:
            claimed[pair.out.resolve()] = pair.input


def collect_pairs(args: argparse.Namespace) -> tuple[list[Pair], bool]:
    """-> (pairs, batch mode). Raises UsageError for combinations that make no sense."""
    if args.pairs is not None:
        if args.input or args.exemplar or args.exemplar_map:
            raise UsageError("--pairs replaces --input, --exemplar and --exemplar-map")
        pairs, batch = pairs_from_csv(args.pairs, args.out), True
    elif args.input is None or args.exemplar is None:
        raise UsageError("give --input and --exemplar (files or folders), or --pairs")
    elif args.input.is_dir():
        pairs, batch = pairs_from_folder(args.input, args.exemplar, args.exemplar_map, args.out), True
    else:
        if args.exemplar.is_dir() or (args.exemplar_map is not None and args.exemplar_map.is_dir()):
            raise UsageError("with one --input file, --exemplar and --exemplar-map must be files")
        out = args.out / f"{pair_key(args.input)}.png" if args.out.is_dir() else args.out
        pairs, batch = [Pair(args.input, args.exemplar, args.exemplar_map, out)], False
    if batch and args.out.exists() and not args.out.is_dir():
        raise UsageError(f"--out {args.out} must be a folder when translating several pairs")
    check_outputs(pairs)
    return pairs, batch


# ---------------------------------------------------------------- running


def save_image(image, path: Path) -> None:
    """PIL image -> file, atomically (temporary name in the same folder, then rename)."""
    from pipeline.data.imageio import atomic_write_bytes

    buffer = io.BytesIO()
    image.save(buffer, format=OUTPUT_FORMATS[path.suffix.lower()])
    atomic_write_bytes(path, buffer.getvalue(), durable=False)


def save_translation(result: "Translation", out: Path, save_warped: bool) -> None:
    save_image(result.image, out)
    if save_warped:
        for level, warped in enumerate(result.warped):
            save_image(warped, out.with_name(f"{out.stem}_warped_l{level}.png"))


def chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def describe(exc: Exception, pair: Pair) -> str:
    """A failure message that names the file: data errors already do, anything else gets the input's name."""
    from pipeline.data.errors import DataError

    return str(exc) if isinstance(exc, DataError) else f"{pair.input}: {type(exc).__name__}: {exc}"


def translate_pairs(translator: "Translator", pairs: Sequence[Pair], *, batch_size: int, save_warped: bool,
                    pose_canvas: tuple[int, int] | None, progress: bool) -> tuple[int, list[str]]:
    """Translate and write every pair, batch_size at a time; a failing pair never stops the others.
    -> (written, failure messages)."""
    from tqdm import tqdm

    written, failures = 0, []
    with tqdm(total=len(pairs), desc=NAME, unit="pair", disable=not progress, file=sys.stderr) as bar:
        for chunk in chunks(pairs, batch_size):
            ready = []
            for pair in chunk:
                if pair.problem:
                    failures.append(pair.problem)
                    continue
                try:
                    ready.append((pair, translator.prepare(pair.input, pair.exemplar, pair.exemplar_map, pose_canvas)))
                except Exception as exc:  # noqa: BLE001 - reported per pair; the batch goes on
                    failures.append(describe(exc, pair))
            try:
                results = translator.run([prepared for _, prepared in ready])
            except Exception as exc:  # noqa: BLE001 - e.g. out of memory: this batch fails, the next may not
                failures.extend(f"{pair.input}: translation failed ({type(exc).__name__}: {exc})" for pair, _ in ready)
                results = []
            for (pair, _), result in zip(ready, results):
                try:
                    save_translation(result, pair.out, save_warped)
                    written += 1
                except OSError as exc:
                    failures.append(f"{pair.out}: cannot write ({exc.strerror or exc})")
            bar.update(len(chunk))
            bar.set_postfix(failed=len(failures), refresh=False)
    return written, failures


def run(args: argparse.Namespace) -> int:
    pairs, batch = collect_pairs(args)
    translator = load_translator(args.model, args.device, None if args.task == "auto" else args.task)
    progress = batch and not args.no_progress and len(pairs) > 1
    written, failures = translate_pairs(translator, pairs, batch_size=args.batch_size, save_warped=args.save_warped,
                                        pose_canvas=tuple(args.pose_canvas) if args.pose_canvas else None,
                                        progress=progress)
    for message in failures:
        print(f"{PROG} {NAME}: error: {message}", file=sys.stderr)
    where = args.out if batch else pairs[0].out
    print(f"{PROG} {NAME}: {written} written, {len(failures)} failed -> {where}")
    return 1 if failures else 0
