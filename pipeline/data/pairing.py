"""Real exemplars: the dataset's pairing list where it has one, else the nearest other image; self pairs (the same
subject in another view) where the dataset lists them.

Retrieval uses cheap descriptors: the class histogram for masks; colour histogram plus a coarse
edge-density grid otherwise. Both are square-rooted (Hellinger), so Euclidean distance compares
distributions sensibly. Never the image itself; ties go to the first name, so it is deterministic.
"""
from __future__ import annotations

import cv2
import numpy as np

COLOUR_BINS = 4  # per RGB channel -> 64-bin colour histogram
EDGE_GRID = 4  # 4x4 cells of mean input-map intensity
DESCRIBE_SIDE = 32  # descriptors are computed on a 32x32 thumbnail


def describe_example(photo: np.ndarray, input_map: np.ndarray, encoding: str, label_nc: int) -> np.ndarray:
    """photo (H, W, 3) uint8, input_map (H, W) ids or (C, H, W) channels -> (D,) float32 descriptor."""
    if encoding == "ids":
        histogram = np.bincount(input_map.reshape(-1).astype(np.int64), minlength=label_nc)[:label_nc]
        return np.sqrt(histogram / max(1, histogram.sum())).astype(np.float32)
    thumb = cv2.resize(photo, (DESCRIBE_SIDE, DESCRIBE_SIDE), interpolation=cv2.INTER_AREA)
    bins = (thumb // (256 // COLOUR_BINS)).reshape(-1, 3).astype(np.int64)
    codes = (bins[:, 0] * COLOUR_BINS + bins[:, 1]) * COLOUR_BINS + bins[:, 2]
    colour = np.bincount(codes, minlength=COLOUR_BINS**3) / len(codes)
    intensity = input_map.astype(np.float32).mean(axis=0) / 255.0
    grid = cv2.resize(intensity, (EDGE_GRID, EDGE_GRID), interpolation=cv2.INTER_AREA).reshape(-1)
    return np.concatenate([np.sqrt(colour), np.sqrt(np.clip(grid, 0, 1)) * 0.5]).astype(np.float32)


def rank_others(descriptors: np.ndarray, queries: np.ndarray, pool: np.ndarray, k: int,
                chunk: int = 1024) -> np.ndarray:
    """For each query index, the k nearest pool indices other than itself, nearest first (ties: the earlier pool
    position). descriptors (N, D); -> (Q, min(k, len(pool) - 1)) int64.

    Pool must hold at least two indices. Distances in float64, chunked: O(Q x P) time with bounded memory.
    """
    k = min(k, len(pool) - 1)
    if k < 1:
        raise ValueError("retrieval pool holds no image other than the query")
    pool_vectors = descriptors[pool].astype(np.float64)
    pool_norms = (pool_vectors**2).sum(axis=1)
    result = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk):
        block = queries[start : start + chunk]
        vectors = descriptors[block].astype(np.float64)
        distance = pool_norms[None, :] - 2 * vectors @ pool_vectors.T + (vectors**2).sum(axis=1)[:, None]
        distance = np.round(distance, 9)  # equal descriptors tie exactly, whatever the BLAS rounding
        distance[block[:, None] == pool[None, :]] = np.inf  # never the image itself
        result[start : start + chunk] = pool[np.argsort(distance, axis=1, kind="stable")[:, :k]]
    return result


def nearest_others(descriptors: np.ndarray, queries: np.ndarray, pool: np.ndarray) -> np.ndarray:
    """For each query index, the nearest pool index other than itself. -> (Q,) int64 (see rank_others)."""
    return rank_others(descriptors, queries, pool, 1)[:, 0]


def first_listed(names: list[str], listed: dict[str, list[str]]) -> np.ndarray:
    """Every item's first listed reference that is another item, as an index; -1 where there is none.

    names: item names (index order); listed: {item name: [ref item names]} already resolved to names.
    """
    position = {name: i for i, name in enumerate(names)}
    first = np.full(len(names), -1, np.int64)
    for i, name in enumerate(names):
        refs = [position[r] for r in listed.get(name, []) if r in position and r != name]
        if refs:
            first[i] = refs[0]
    return first


def choose_exemplars(names: list[str], listed: dict[str, list[str]],
                     retrieved: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Exemplar index and how it was chosen ("listed" or "retrieved") for every item.

    names, listed: as first_listed; retrieved: (N,) every item's nearest other training image (rank_others).
    """
    first = first_listed(names, listed)
    exemplars = np.where(first >= 0, first, retrieved).astype(np.int64)
    return exemplars, ["listed" if f >= 0 else "retrieved" for f in first]


def pairing_list(names: list[str], items: np.ndarray, ranked: np.ndarray) -> str:
    """The official pairing-list format, one line per item: "name,ref1,ref2,...". items (Q,), ranked (Q, k)."""
    return "".join(",".join([names[i], *(names[r] for r in refs)]) + "\n" for i, refs in zip(items, ranked))


def resolve_listed(pairs: dict[str, list[str]], aliases: dict[str, str]) -> tuple[dict[str, list[str]], int]:
    """Map a pairing list's spellings to item names, leaving out references to the item itself.
    aliases: {spelling: item name}. -> ({item name: [ref item names]}, number of references that match no item)."""
    resolved: dict[str, list[str]] = {}
    unmatched = 0
    for name, refs in pairs.items():
        key = aliases.get(name)
        if key is None:
            unmatched += 1
            continue
        matched = [aliases[r] for r in refs if r in aliases]
        unmatched += len(refs) - len(matched)
        if others := [r for r in matched if r != key]:
            resolved[key] = others
    return resolved, unmatched
