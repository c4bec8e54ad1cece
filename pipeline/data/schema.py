"""The shard contract (DESIGN.md): sample keys, member names, manifest format; shared by writer and loader.

    __key__              "<source>/<name>#<variant>"
    input.png            x_A: class ids (uint8/uint16) or channels stacked vertically ((C*H, W) uint8)
    image.jpg            x_B
    exemplar.jpg         y_B, the real exemplar;     exemplar_input.png  its map y_A
    pseudo.jpg           the pseudo exemplar;        pseudo_input.png    its map
    pseudo_flow.npy      (2, H, W) float16: (y, x) in pseudo.jpg of each x_B pixel, NaN where invalid
    meta.json            source, task, size, label_nc, pairing, augmentation (+ synthetic palettes)
"""
from __future__ import annotations

import hashlib
from typing import Any

SHARD_FORMAT = "cocosnet-wds/1"
MEMBERS = ("input.png", "image.jpg", "exemplar.jpg", "exemplar_input.png", "pseudo.jpg", "pseudo_input.png",
           "pseudo_flow.npy", "meta.json")


def sample_key(source: str, name: str, variant: int) -> str:
    return f"{source}/{name}#{variant}"


def stable_hash(*parts: Any) -> int:
    """A 63-bit integer from the parts' text: the same on every machine and run (unlike hash())."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1
