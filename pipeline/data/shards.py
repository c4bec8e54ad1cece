"""Shard stage: prepared items -> WebDataset tars of (x_A, x_B, real exemplar, pseudo exemplars with their flow).

One sample per image, key "<source>/<name>", members as pipeline/data/schema.py lists them: x_A, x_B, the real
exemplar and its map, `shard.pseudo_per_image` pseudo exemplars, each with its map and exact flow (the
loader picks one per epoch), and the self pair with its map where the dataset lists one.

Every shard is written under a temporary name, hashed, renamed when complete, and only then entered with its sha256
and size in completed.json: a run keeps an existing tar only when that record vouches for its bytes (an interrupted
run resumes, a truncated or altered tar is rewritten). Everything is a function of (prepared data, params,
seed, code): the same inputs give byte-identical shards (tar headers zeroed, fixed encoders,
per-sample seeds from the key). manifest.json lists shards, sample counts, sha256 and params;
reports/shard_report.json lists every skipped file with its reason.
"""
from __future__ import annotations

import concurrent.futures
import functools
import io
import multiprocessing
import os
import tarfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from tqdm import tqdm

from pipeline.data.augment import make_pseudo_exemplar
from pipeline.data.config import DataConfig, ShardConfig
from pipeline.data.errors import DataError
from pipeline.data.imageio import (atomic_write_bytes, atomic_write_json, decode_npy, decode_png, encode_jpeg, encode_json, encode_map,
                                   encode_npy, read_json, read_photo_png, unstack_channels)
from pipeline.data.pairing import choose_exemplars, first_listed, pairing_list, rank_others
from pipeline.data.prepare import FORMAT as PREPARED_FORMAT
from pipeline.data.prepare import code_version, fingerprint, reset_if_stale
from pipeline.data.schema import (SELF_MEMBERS, SHARD_FORMAT, member_names, pseudo_members, sample_key, sha256_file,
                                  stable_hash)
from pipeline.params import section

FORMAT = SHARD_FORMAT
SPLITS = ("train", "val")
# Every image's shard.retrieval_top_k nearest training images, in the official CoCosNet list format
RETRIEVAL_LISTS = {"train": "retrieval_train.txt", "val": "retrieval_val.txt"}
COMPLETED = "completed.json"  # {shard name: {samples, sha256, bytes}} of every tar this stage finished writing


@dataclass(frozen=True)
class PlannedSample:
    item: int  # index into the prepared items
    exemplar: int  # index of the real exemplar
    pairing: str  # "listed" or "retrieved"
    self_pair: int | None = None  # index of the self pair (the same subject in another view), if listed


@dataclass(frozen=True)
class PlannedShard:
    name: str  # file name, e.g. "train-00003.tar"
    split: str
    samples: tuple[PlannedSample, ...]


# ---------------------------------------------------------------- the prepared data


class Prepared:
    """Read-only view of the prepare stage's output (data/prepared)."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        index_path = self.directory / "index.json"
        self.index = read_json(index_path)
        if self.index.get("format") != PREPARED_FORMAT:
            raise DataError(f"{index_path}: not a prepared dataset of format {PREPARED_FORMAT} (run stages.prepare)")
        self.items: list[dict] = self.index["items"]
        self.names = [item["name"] for item in self.items]
        self.source = self.index["source"]
        self.descriptors = decode_npy((self.directory / "descriptors.npy").read_bytes(), "descriptors.npy")
        if len(self.descriptors) != len(self.items):
            raise DataError(f"{self.directory}: descriptors.npy and index.json disagree (re-run stages.prepare)")

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(self.source["image_size"])

    @functools.lru_cache(maxsize=512)
    def photo(self, i: int) -> np.ndarray:
        return read_photo_png(self.directory / self.items[i]["photo"])

    @functools.lru_cache(maxsize=512)
    def input_map(self, i: int) -> np.ndarray:
        path = self.directory / self.items[i]["input"]
        array = decode_png(path.read_bytes(), str(path))
        if self.index["input_encoding"] == "ids":
            return array
        return unstack_channels(array, self.index["input_channels"], str(path))

    @functools.lru_cache(maxsize=512)
    def jpeg(self, i: int, quality: int) -> bytes:
        return encode_jpeg(self.photo(i), quality)


# ---------------------------------------------------------------- planning


def assign_splits(prepared: Prepared, val_fraction: float, seed: int) -> list[str]:
    """"train"/"val" per item: the dataset's split where it has one, else a seeded exact fraction."""
    splits = [item.get("split_hint") or "" for item in prepared.items]
    free = sorted((i for i, s in enumerate(splits) if s not in SPLITS),
                  key=lambda i: stable_hash(seed, "split", prepared.names[i]))
    num_val = round(val_fraction * len(free))
    if val_fraction > 0 and num_val == 0 and len(free) >= 2:
        num_val = 1
    num_val = min(num_val, max(0, len(free) - 1))  # always leave one training image
    for rank, i in enumerate(free):
        splits[i] = "val" if rank < num_val else "train"
    return splits


def split_evenly(samples: list[PlannedSample], per_shard: int, min_shards: int) -> list[list[PlannedSample]]:
    """Chunks of near-equal size: at most per_shard each, and at least min_shards when samples allow."""
    if not samples:
        return []
    count = max(-(-len(samples) // per_shard), min(min_shards, len(samples)))
    base, extra = divmod(len(samples), count)
    chunks, start = [], 0
    for k in range(count):
        size = base + (k < extra)
        chunks.append(samples[start : start + size])
        start += size
    return chunks


def plan_shards(prepared: Prepared, cfg: ShardConfig, seed: int) -> tuple[list[PlannedShard], dict[str, Any]]:
    """Splits, exemplars and the sample order of every shard. -> (shards, pairing statistics)."""
    splits = assign_splits(prepared, cfg.val_fraction, seed)
    pool = np.array([i for i, s in enumerate(splits) if s == "train"], np.int64)
    if len(pool) < 2:  # retrieval needs another image; fall back to all images
        pool = np.arange(len(prepared.items))
    if len(pool) < 2:
        raise DataError(f"{prepared.directory}: need at least 2 valid images to pair exemplars, got {len(pool)}")
    ranked = rank_others(prepared.descriptors, np.arange(len(prepared.items)), pool, cfg.retrieval_top_k)
    exemplars, how = choose_exemplars(prepared.names, prepared.index.get("listed_pairs", {}), ranked[:, 0])
    self_pairs = [None if i < 0 else int(i) for i in first_listed(prepared.names, prepared.index.get("self_pairs", {}))]
    shards = []
    for split in SPLITS:
        samples = [PlannedSample(i, int(exemplars[i]), how[i], self_pairs[i])
                   for i in range(len(splits)) if splits[i] == split]
        if split == "train":  # mix images across shards; the loader also shuffles
            order = sorted(range(len(samples)), key=lambda k: stable_hash(seed, "order", k))
            samples = [samples[k] for k in order]
        for number, chunk in enumerate(split_evenly(samples, cfg.samples_per_shard, cfg.min_shards_per_split)):
            shards.append(PlannedShard(f"{split}-{number:05d}.tar", split, tuple(chunk)))
    stats = {"listed": how.count("listed"), "retrieved": how.count("retrieved"),
             "images": {s: splits.count(s) for s in SPLITS},
             "self_pairs": {s: sum(p is not None for p, t in zip(self_pairs, splits) if t == s) for s in SPLITS},
             "retrieval_lists": {split: pairing_list(prepared.names, items, ranked[items])
                                 for split in SPLITS if len(items := np.flatnonzero(np.array(splits) == split))}}
    return shards, stats


# ---------------------------------------------------------------- writing


def build_sample(prepared: Prepared, planned: PlannedSample, cfg: ShardConfig,
                 seed: int) -> tuple[str, dict[str, bytes]]:
    """All members of one sample. -> (key, {suffix: bytes})."""
    index, source = prepared.index, prepared.source
    item, exemplar = prepared.items[planned.item], prepared.items[planned.exemplar]
    key = sample_key(source["source"], item["name"])
    sample = {
        "input.png": encode_map(prepared.input_map(planned.item)),
        "image.jpg": prepared.jpeg(planned.item, cfg.jpeg_quality),
        "exemplar.jpg": prepared.jpeg(planned.exemplar, cfg.jpeg_quality),
        "exemplar_input.png": encode_map(prepared.input_map(planned.exemplar)),
    }
    augmentation = []
    for k in range(cfg.pseudo_per_image):
        pseudo = make_pseudo_exemplar(prepared.photo(planned.item), prepared.input_map(planned.item), cfg.augment,
                                      seed=stable_hash(seed, "pseudo", key, k) % 2**31,
                                      map_interpolation=index["map_interpolation"], map_fill=tuple(index["map_fill"]))
        photo, input_map, flow = pseudo_members(k)
        sample[photo] = encode_jpeg(pseudo.image, cfg.jpeg_quality)
        sample[input_map] = encode_map(pseudo.input_map)
        sample[flow] = encode_npy(pseudo.flow.astype(np.float16))
        augmentation.append(pseudo.params)
    if planned.self_pair is not None:
        photo, input_map = SELF_MEMBERS
        sample[photo] = prepared.jpeg(planned.self_pair, cfg.jpeg_quality)
        sample[input_map] = encode_map(prepared.input_map(planned.self_pair))
    meta = {
        "key": key, "source": source["source"], "task": source["task"], "name": item["name"],
        "size": list(prepared.image_size), "label_nc": source["label_nc"],
        "input_encoding": index["input_encoding"], "input_channels": index["input_channels"],
        "exemplar": exemplar["name"], "pairing": planned.pairing, "augmentation": augmentation,
        "self_pair": None if planned.self_pair is None else prepared.names[planned.self_pair],
    }
    if "palette" in item.get("meta", {}):
        meta["palette"] = item["meta"]["palette"]
        meta["exemplar_palette"] = exemplar["meta"].get("palette")
    sample["meta.json"] = encode_json(meta)
    assert sorted(sample) == sorted(member_names(cfg.pseudo_per_image, planned.self_pair is not None)), \
        "the shard schema and the writer disagree"
    return key, sample


def tar_member(name: str, size: int) -> tarfile.TarInfo:
    """A tar header with nothing that varies between runs or machines."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o444
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def write_tar(path: Path, samples: Iterable[tuple[str, dict[str, bytes]]]) -> dict[str, Any]:
    """Write samples to `path` via a temporary file renamed at the end. -> its completion record: samples, sha256,
    bytes (hashed before the rename)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    count = 0
    try:
        with open(temporary, "wb") as f:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.GNU_FORMAT) as tar:
                for key, members in samples:
                    for suffix in sorted(members):
                        tar.addfile(tar_member(f"{key}.{suffix}", len(members[suffix])), io.BytesIO(members[suffix]))
                    count += 1
            f.flush()
            os.fsync(f.fileno())
        record = {"samples": count, "sha256": sha256_file(temporary), "bytes": temporary.stat().st_size}
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    return record


_WORKER_PREPARED: Prepared | None = None


def _worker_init(prepared_dir: str) -> None:
    global _WORKER_PREPARED
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import cv2

    cv2.setNumThreads(1)  # one process per core already
    _WORKER_PREPARED = Prepared(prepared_dir)


def _write_planned_shard(shard: PlannedShard, out_dir: str, cfg: ShardConfig, seed: int) -> dict[str, Any]:
    prepared = _WORKER_PREPARED
    samples = (build_sample(prepared, s, cfg, seed) for s in shard.samples)
    return write_tar(Path(out_dir) / shard.name, samples)


def finished_shards(out_dir: Path, shards: list[PlannedShard]) -> dict[str, dict[str, Any]]:
    """The completion records (COMPLETED) of the planned shards whose tar is there with exactly the recorded size and
    sha256; any other tar under a planned name (truncated, altered, or never recorded) is removed."""
    records = read_json(out_dir / COMPLETED) if (out_dir / COMPLETED).exists() else {}
    finished = {}
    for shard in shards:
        path, record = out_dir / shard.name, records.get(shard.name)
        if record and path.exists() and path.stat().st_size == record["bytes"] and \
                record["samples"] == len(shard.samples) and sha256_file(path) == record["sha256"]:
            finished[shard.name] = record
        else:
            path.unlink(missing_ok=True)
    return finished


def check_skipped(prepared: Prepared, cfg: ShardConfig) -> dict[str, Any]:
    """Skip statistics; fails when more than shard.max_skipped_fraction of the images were unusable."""
    skipped = prepared.index["skipped"]
    total = len(skipped) + len(prepared.items)
    fraction = len(skipped) / total if total else 0.0
    reasons = Counter(s["reason"].split(" (")[0] for s in skipped)
    return {"count": len(skipped), "total": total, "fraction": fraction,
            "max_fraction": cfg.max_skipped_fraction, "ok": fraction <= cfg.max_skipped_fraction,
            "reasons": dict(reasons.most_common())}


def write_report(report_path: Path | None, prepared: Prepared, skip_stats: dict, extra: dict) -> None:
    if report_path is not None:
        atomic_write_json(report_path, {"skipped": prepared.index["skipped"], "skip_summary": skip_stats,
                                        "listed_unmatched": prepared.index.get("listed_unmatched", 0),
                                        "self_unmatched": prepared.index.get("self_unmatched", 0), **extra})


def write_shards(prepared_dir: str | Path, out_dir: str | Path, cfg: ShardConfig, *, seed: int = 0,
                 report_path: str | Path | None = None, params: dict | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Run the shard stage. -> the manifest (also written to out_dir/manifest.json).

    params: the params.yaml sections recorded in the manifest (defaults to the shard config).
    """
    prepared = Prepared(prepared_dir)
    out_dir = Path(out_dir)
    report_path = Path(report_path) if report_path else None
    skip_stats = check_skipped(prepared, cfg)
    if not skip_stats["ok"]:
        write_report(report_path, prepared, skip_stats, {"status": "failed: too many skipped images"})
        top = "; ".join(f"{n} x {r}" for r, n in list(skip_stats["reasons"].items())[:3])
        examples = "; ".join(f"{s['file']}: {s['reason']}" for s in prepared.index["skipped"][:3])
        raise DataError(f"{skip_stats['count']} of {skip_stats['total']} images were skipped "
                        f"({skip_stats['fraction']:.1%} > shard.max_skipped_fraction {cfg.max_skipped_fraction:.1%}). "
                        f"Reasons: {top}. E.g. {examples}. Full list: {report_path}")

    shards, pairing_stats = plan_shards(prepared, cfg, seed)
    # The pairing lists are not in the prepared fingerprint (prepare re-reads them every run): a changed list
    # must rewrite the shards too
    pairs = {name: prepared.index.get(name, {}) for name in ("listed_pairs", "self_pairs")}
    expected = fingerprint({"format": FORMAT, "prepared": prepared.index["fingerprint"], "shard": cfg.to_dict(),
                            "seed": seed, "code": code_version(), "pairs": fingerprint(pairs)})
    out_dir.mkdir(parents=True, exist_ok=True)
    owned = tuple(p.name for p in out_dir.glob("*.tar")) + tuple(p.name for p in out_dir.glob(".*.tmp"))
    reset_if_stale(out_dir, expected, owned=owned + ("manifest.json", COMPLETED, *RETRIEVAL_LISTS.values()))
    for stale in out_dir.glob(".*.tar.*.tmp"):  # left by an interrupted run
        stale.unlink()

    records = finished_shards(out_dir, shards)

    def completed(name: str, record: dict[str, Any]) -> None:
        records[name] = record
        atomic_write_json(out_dir / COMPLETED, records, durable=False)

    todo = [s for s in shards if s.name not in records]
    total = sum(len(s.samples) for s in shards)
    with tqdm(total=total, desc="shard", unit="sample", disable=not progress) as bar:
        bar.update(total - sum(len(s.samples) for s in todo))  # resumed: complete shards are skipped
        if cfg.num_workers <= 1 or len(todo) <= 1:
            for shard in todo:
                samples = (build_sample(prepared, s, cfg, seed) for s in shard.samples)
                completed(shard.name, write_tar(out_dir / shard.name, _counting(samples, bar)))
        else:
            context = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads
            with concurrent.futures.ProcessPoolExecutor(min(cfg.num_workers, len(todo)), mp_context=context,
                                                        initializer=_worker_init,
                                                        initargs=(str(prepared.directory),)) as pool:
                futures = {pool.submit(_write_planned_shard, s, str(out_dir), cfg, seed): s for s in todo}
                for future in concurrent.futures.as_completed(futures):
                    completed(futures[future].name, future.result())
                    bar.update(len(futures[future].samples))

    for split, text in pairing_stats["retrieval_lists"].items():
        atomic_write_bytes(out_dir / RETRIEVAL_LISTS[split], text.encode())
    manifest = {
        "format": FORMAT,
        "fingerprint": expected,
        "source": prepared.source["source"],
        "task": prepared.source["task"],
        "label_nc": prepared.source["label_nc"],
        "image_size": list(prepared.image_size),
        "input_encoding": prepared.index["input_encoding"],
        "input_channels": prepared.index["input_channels"],
        "class_channels": prepared.index.get("class_channels"),
        "pseudo_per_image": cfg.pseudo_per_image,
        "splits": {split: {"samples": sum(len(s.samples) for s in shards if s.split == split),
                           "images": pairing_stats["images"][split],
                           "shards": [{"name": s.name, **records[s.name]} for s in shards if s.split == split]}
                   for split in SPLITS},
        "skipped": {"count": skip_stats["count"], "fraction": round(skip_stats["fraction"], 6),
                    "reasons": skip_stats["reasons"]},
        "pairing": {"listed": pairing_stats["listed"], "retrieved": pairing_stats["retrieved"],
                    "self_pairs": pairing_stats["self_pairs"],
                    "unmatched": {"listed": prepared.index.get("listed_unmatched", 0),
                                  "self": prepared.index.get("self_unmatched", 0)},
                    "retrieval_lists": {split: RETRIEVAL_LISTS[split] for split in pairing_stats["retrieval_lists"]}},
        "params": params if params is not None else {"shard": cfg.to_dict(), "seed": seed},
        "prepared": {"fingerprint": prepared.index["fingerprint"], "source": prepared.source},
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    write_report(report_path, prepared, skip_stats, {"status": "ok", "pairing": manifest["pairing"],
                                                     "splits": {s: {k: manifest["splits"][s][k]
                                                                    for k in ("samples", "images")}
                                                                for s in SPLITS}})
    return manifest


def _counting(samples: Iterable, bar: tqdm) -> Iterable:
    for sample in samples:
        yield sample
        bar.update(1)


def run_shard(params: Mapping[str, Any], prepared_dir: str | Path = "data/prepared",
              out_dir: str | Path = "data/shards",
              report_path: str | Path | None = "reports/shard_report.json") -> dict[str, Any]:
    """The shard stage: the `shard:` section (and data.seed) of params.yaml -> out_dir. -> the manifest."""
    data, shard = section(params, "data"), section(params, "shard")
    return write_shards(prepared_dir, out_dir, ShardConfig.from_params(shard), seed=DataConfig.from_params(data).seed,
                        report_path=report_path, params={"data": data, "shard": shard})
