"""Any folder of photos: edge -> image, edges computed with Canny."""
from __future__ import annotations

from pipeline.data.errors import DataError
from pipeline.data.imageio import fit, read_photo
from pipeline.data.maps import as_edge_map, canny_edges
from pipeline.data.sources.base import PHOTO_SUFFIXES, Example, ItemRef, Source, find_photos, safe_name, unique_items

PAIRING_LIST = "pairs.txt"  # optional: "photo,ref1,ref2,..." with paths relative to the folder (or file names)
SELF_PAIR_LIST = "self_pairs.txt"  # optional, same format: the same scene in another view (e.g. another frame)


class FolderSource(Source):
    name = "folder"
    pairing_files = (PAIRING_LIST,)
    self_pair_files = (SELF_PAIR_LIST,)
    tasks = ("edge",)
    input_encoding = "channels"

    def __init__(self, *, root, task: str = "edge", image_size=(256, 256), label_nc: int = 1, seed: int = 0):
        super().__init__(root=root, task=task, image_size=image_size, label_nc=label_nc, seed=seed)
        self.check_label_nc(1, "a Canny edge map")

    def items(self) -> list[ItemRef]:
        root = self.require_root(f"any folder of {'/'.join(PHOTO_SUFFIXES)} photos")
        items = []
        for photo in find_photos(root):
            relative = photo.relative_to(root).as_posix()
            items.append(ItemRef(name=safe_name(relative), path=str(photo), aliases=(relative, photo.name, photo.stem)))
        if not items:
            raise DataError(f"{root}: no photos found (empty dataset); expected files ending in {PHOTO_SUFFIXES}")
        return unique_items(items)

    def load(self, item: ItemRef) -> Example:
        photo = fit(read_photo(item.path), self.image_size, "area")
        return Example(photo=photo, input_map=as_edge_map(canny_edges(photo))[None])
