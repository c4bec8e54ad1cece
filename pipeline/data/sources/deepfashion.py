"""DeepFashionHD as CoCosNet v2 uses it: pose -> person, input = the official 20-channel pose encoding.

Layout: img/<any folders>/<name>.jpg with OpenPose output pose/<same folders>/<name>_candidate.txt and
<name>_subset.txt; optional train.txt / val.txt (paths like img/...jpg; images in neither list are
split by shard.val_fraction), the pairing lists deepfashion_ref.txt / deepfashion_ref_test.txt
("img/a.jpg,img/ref1.jpg,..."; the first listed reference that exists is the real exemplar) and the official
--video_like list deepfashion_self_pair.txt (same format: the same person in another pose; the first that exists
is the sample's self pair, stored in the shards beside the pseudo exemplars, used when train.video_like is set).
Names in the lists may be spelled "img/MEN/...jpg", "MEN/...jpg" or with backslashes.
"""
from __future__ import annotations

from pathlib import Path

from pipeline.data.errors import DataError, SkipSample
from pipeline.data.imageio import fit, read_photo
from pipeline.data.pose import POSE_CHANNELS, encode_pose, keypoints_in_frame, read_openpose
from pipeline.data.sources.base import (Example, ItemRef, Source, find_photos, read_name_list,
                                        safe_name, unique_items)

LAYOUT = "DeepFashionHD layout: img/**/<name>.jpg with pose/**/<name>_candidate.txt and <name>_subset.txt"
PAIRING_LISTS = ("deepfashion_ref.txt", "deepfashion_ref_test.txt")
SELF_PAIR_LIST = "deepfashion_self_pair.txt"


class DeepFashionSource(Source):

    pairing_files = PAIRING_LISTS
    self_pair_files = (SELF_PAIR_LIST,)
    name = "deepfashion"
    tasks = ("pose",)
    input_encoding = "channels"
    map_interpolation = "linear"  # distance maps are smooth; resample them linearly
    map_fill = (0,) * 3 + (255,) * 17  # outside the frame: no skeleton, far from every limb

    def __init__(self, *, root, task: str = "pose", image_size=(256, 256), label_nc: int = POSE_CHANNELS,
                 seed: int = 0):
        super().__init__(root=root, task=task, image_size=image_size, label_nc=label_nc, seed=seed)
        self.check_label_nc(POSE_CHANNELS, "RGB skeleton + 17 limb distance maps")

    def items(self) -> list[ItemRef]:
        root = self.require_root(LAYOUT)
        splits = {}
        for list_name, split in (("train.txt", "train"), ("val.txt", "val")):
            if (root / list_name).exists():
                splits.update({n.lstrip("./"): split for n in read_name_list(root / list_name)})
        items = []
        for photo in find_photos(root / "img"):
            relative = photo.relative_to(root).as_posix()  # img/MEN/.../01_1_front.jpg
            pose_stem = root / "pose" / photo.relative_to(root / "img").with_suffix("")
            items.append(ItemRef(
                name=safe_name(relative), path=str(photo), aliases=(relative, relative[len("img/"):]),
                split_hint=splits.get(relative),
                files={"candidate": f"{pose_stem}_candidate.txt", "subset": f"{pose_stem}_subset.txt"},
            ))
        if not items:
            raise DataError(f"{root}: no photos under img/ (empty dataset); expected {LAYOUT}")
        return unique_items(items)

    def load(self, item: ItemRef) -> Example:
        photo = read_photo(item.path)
        candidate, joints = read_openpose(Path(item.files["candidate"]), Path(item.files["subset"]))
        height, width = photo.shape[:2]
        if not keypoints_in_frame(candidate, joints, (height, width)):
            raise SkipSample(item.files["candidate"], f"keypoints outside the photo {item.path} "
                             f"({width}x{height}): pose and photo sizes do not match")
        pose = encode_pose(candidate, joints, (height, width), self.image_size)
        return Example(photo=fit(photo, self.image_size, "area"), input_map=pose)
