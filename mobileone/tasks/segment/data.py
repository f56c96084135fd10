"""Segmentation data: image/mask folders or Pascal VOC (detected), and the joint augmentation of image and mask.

Two layouts are read, and told apart by their folders:

- ``masks``: ``{train,val}/images/<stem>.<jpg|png|...>`` and ``{train,val}/masks/<stem>.png``, a
  mask pixel being the class index and 255 "ignore"; class names from ``classes.txt`` (one per
  line, line i naming class i) in the root or in each split, else ``0 .. max`` read off the masks.
- ``voc``: ``JPEGImages/``, ``SegmentationClass/`` (palette PNGs) and ``ImageSets/Segmentation/
  {train,val}.txt``, also found under ``VOC2012/`` or ``VOCdevkit/VOC2012/``; the 21 VOC classes.

What users' folders get wrong is caught up front with a message that says what was found and what
to do: a mask of another size than its image, RGB (colour-coded) or 16-bit masks, JPEG masks,
class lists that differ between train and val, repeated class names (every line of ``classes.txt``
is a name), a split whose masks hold fewer than two classes besides 255 (binary masks saved as
0/255 included: every object pixel would be "ignore"). An image without a mask is skipped with a
warning that counts them, masks without an image are named; a mask value that is neither a class
nor 255 stops with the file's name (it is checked as each mask is read, with the same one-line
message in a data worker). Images and masks are read together by ``mobileone.tasks.images``: the
image's EXIF orientation turns its mask too (a mask of the stored size was made on the pixels as
stored; one of the upright size is used as it is). Unreadable files, decompression bombs included,
come back as ``(None, path)`` samples, which :func:`collate_masks` drops and the engine counts, as
for classification.

Augmentation (torchvision transforms v2, image and ``tv_tensors.Mask`` together): random scale of
the short side to 0.5-2x the crop size, a random crop padded with the ignore index, a horizontal
flip. It is seeded per sample from (seed, epoch, index), so resumed and multi-process runs see the
same crops. Validation images are not resized: the metrics are computed on the full-resolution masks.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import tv_tensors
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from ...core.config import IMAGENET_MEAN, IMAGENET_STD
from ...engine.distributed import seeded
from ...engine.task import DataError
from ..datasets_check import pair_by_stem, read_names, read_text, refuse_duplicates, require_classes, warn_unmatched
from ..images import UnreadableImageError, load_image_and_mask, open_image, read_header
from .masks import VOC_CLASSES, check_mask_mode, check_mask_values, decode_mask, read_mask
from .model import IGNORE_INDEX

FORMATS = ("masks", "voc")
SCALE_RANGE = (0.5, 2.0)  # random short side, as a multiple of the crop size (torchvision's and DeepLab's recipe)
Sample = tuple[Path, Path]  # (image, mask)


# ----------------------------------------------------------------------------- masks


# ----------------------------------------------------------------------------- layouts


def find_voc_root(root: Path) -> Path | None:
    """The folder with ``JPEGImages`` and ``SegmentationClass``: ``root``, ``VOC2012/`` or ``VOCdevkit/VOC2012/``."""
    for cand in (root, root / "VOC2012", root / "VOCdevkit" / "VOC2012"):
        if (cand / "JPEGImages").is_dir() and (cand / "SegmentationClass").is_dir():
            return cand
    return None


def detect_format(root: str | os.PathLike, data_format: str = "auto") -> tuple[Path, str]:
    """(dataset root, ``masks`` or ``voc``), read off the folders; a DataError describing both layouts otherwise."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"segmentation data folder {root} does not exist")
    if data_format not in ("auto", *FORMATS):
        raise DataError(
            f"--data-format {data_format!r} is a detection format; segmentation reads {' or '.join(FORMATS)} (or auto)"
        )
    voc = find_voc_root(root)
    if data_format in ("auto", "voc") and voc is not None:
        return voc, "voc"
    if data_format in ("auto", "masks") and (root / "train" / "images").is_dir():
        return root, "masks"
    raise DataError(
        f"{root} is not a segmentation dataset{'' if data_format == 'auto' else f' in the {data_format} layout'}. "
        "Expected either train/images/* with train/masks/*.png (same file stems; mask pixel = class index, "
        f"{IGNORE_INDEX} = ignore) and the same under val/, optionally classes.txt; or Pascal VOC: JPEGImages/, "
        "SegmentationClass/ and ImageSets/Segmentation/{train,val}.txt"
    )


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


def mask_folder_samples(split_dir: Path) -> tuple[list[Sample], list[Path]]:
    """(image, mask) pairs of one split of the ``masks`` layout, and the images that have no mask."""
    images_dir, masks_dir = split_dir / "images", split_dir / "masks"
    for d in (images_dir, masks_dir):
        if not d.is_dir():
            raise DataError(f"{d} does not exist; the masks layout needs {split_dir}/images/ and {split_dir}/masks/")
    exts = tuple(IMG_EXTENSIONS)
    images = [p for p in _files(images_dir) if p.suffix.lower() in exts]
    masks = [p for p in _files(masks_dir) if p.suffix.lower() in exts]
    lossy = [p.name for p in masks if p.suffix.lower() not in (".png", ".bmp", ".tif", ".tiff")]
    if lossy:
        raise DataError(
            f"{masks_dir} holds lossy masks ({', '.join(lossy[:5])}): JPEG compression changes class "
            "indices at every edge; save masks as PNG"
        )
    refuse_duplicates(
        [p.stem for p in masks], "mask stems", str(masks_dir), "keep one mask per image stem (a.png, not also a.bmp)"
    )
    pairs, orphans = pair_by_stem(images, images_dir, masks, masks_dir, "mask")
    warn_unmatched(orphans, masks_dir, "mask(s)", "a mask is named after its image: images/a.jpg -> masks/a.png")
    missing = [p for p in images if p not in pairs]
    return [(p, pairs[p]) for p in images if p in pairs], missing


def voc_samples(root: Path, split: str) -> tuple[list[Sample], list[Path]]:
    """(image, mask) pairs listed in ``ImageSets/Segmentation/<split>.txt``, and the listed images without a mask."""
    listing = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not listing.is_file():
        raise DataError(f"{listing} does not exist; a VOC layout lists each split's image ids there")
    ids = [line.split()[0] for line in read_text(listing).splitlines() if line.strip()]
    refuse_duplicates(ids, "image ids", str(listing), "list each image once, or it weighs twice in training and mIoU")
    samples, missing, no_image = [], [], []
    for i in ids:
        image, mask = root / "JPEGImages" / f"{i}.jpg", root / "SegmentationClass" / f"{i}.png"
        if not image.is_file():
            no_image.append(i)
        elif not mask.is_file():
            missing.append(image)
        else:
            samples.append((image, mask))
    if no_image:
        warnings.warn(
            f"{listing}: {len(no_image)} listed id(s) have no JPEGImages/<id>.jpg and are skipped, e.g. {no_image[:3]}",
            stacklevel=2,
        )
    return samples, missing


def read_classes(root: Path) -> list[str] | None:
    """Class names from ``classes.txt`` in the root or the splits; train and val must agree."""
    found = {}
    for where in (root, root / "train", root / "val"):
        f = where / "classes.txt"
        if f.is_file():
            found[f] = read_names(f)
    if not found:
        return None
    for f, names in found.items():
        if len(names) < 2:
            raise DataError(
                f"{f} lists {len(names)} class(es); segmentation needs at least 2 (e.g. background and "
                "one object class), one name per line"
            )
        if len(names) > IGNORE_INDEX:
            raise DataError(f"{f} lists {len(names)} classes; at most {IGNORE_INDEX} fit 8-bit masks")
    first_file, first = next(iter(found.items()))
    for f, names in found.items():
        if names != first:
            only_a, only_b = [n for n in first if n not in names], [n for n in names if n not in first]
            change = (
                f"only in {first_file}: {only_a[:10]}, only in {f}: {only_b[:10]}"
                if only_a or only_b
                else ("the same names in another order")
            )
            raise DataError(
                f"{first_file} and {f} list different classes ({change}); class i must mean the same "
                "in train and val: make the lists identical (one classes.txt in the root is "
                "enough)"
            )
    return first


def check_pairs(samples: Sequence[Sample]) -> None:
    """Headers only (no pixels): every mask is 8-bit indices and has its image's size, as stored or as
    shown upright (:func:`load_image_and_mask`); a DataError listing offenders."""
    wrong_size = []
    for image, mask in samples:
        try:
            with open_image(mask) as m:
                check_mask_mode(mask, m)
                mask_size = m.size
            header = read_header(image)
        except OSError:
            continue  # unreadable files (bombs too) are skipped and counted when they are loaded
        if mask_size not in (header.stored, header.size):
            w, h = header.size
            wrong_size.append(f"{mask.name} {mask_size[0]}x{mask_size[1]} vs image {image.name} {w}x{h}")
    if wrong_size:
        raise DataError(
            f"{len(wrong_size)} mask(s) differ in size from their image (width x height): "
            f"{'; '.join(wrong_size[:5])}. A mask must match its image pixel for pixel; re-export them at "
            "the image size (nearest-neighbour resizing if need be)"
        )


def mask_histogram(samples: Sequence[Sample]) -> np.ndarray:
    """Pixel counts of each mask value 0..255 over the readable masks (reads every mask once)."""
    counts = np.zeros(256, dtype=np.int64)
    for mask in readable_masks(samples):
        counts += np.bincount(mask.ravel(), minlength=256)
    return counts


def readable_masks(samples: Sequence[Sample], classes: Sequence[str] | None = None) -> Iterator[np.ndarray]:
    """The masks that decode, one at a time (values checked against ``classes`` when given)."""
    for _, path in samples:
        try:
            mask = read_mask(path)
        except OSError:
            continue
        if classes is not None:
            check_mask_values(mask, len(classes), path)
        yield mask


def infer_classes(train: Sequence[Sample], val: Sequence[Sample], root: Path) -> list[str]:
    """Without classes.txt: classes ``0 .. max value`` of the training masks; val may not add any."""
    hist_train, hist_val = mask_histogram(train), mask_histogram(val)
    hist_train[IGNORE_INDEX] = hist_val[IGNORE_INDEX] = 0
    seen = np.flatnonzero(hist_train)
    if len(seen) < 2:
        raise DataError(
            f"the training masks under {root} hold {'only class ' + str(seen.tolist()) if len(seen) else 'no class'} "
            f"besides the ignore index {IGNORE_INDEX}; segmentation needs at least 2 classes. Binary masks saved as "
            f"0/255 mark the object as 'ignore': save it as 1"
        )
    n = int(seen.max()) + 1
    extra = [int(v) for v in np.flatnonzero(hist_val) if v >= n]
    if extra:
        raise DataError(
            f"val masks hold class values {extra[:10]} that no training mask has (train: 0..{n - 1}); "
            f"train and val must share one class list: write it to {root}/classes.txt"
        )
    absent = [int(v) for v in range(n) if hist_train[v] == 0]
    if absent:
        warnings.warn(
            f"classes {absent[:10]} (below the largest mask value {n - 1}) appear in no training mask; "
            f"name the classes in {root}/classes.txt to make the list explicit",
            stacklevel=2,
        )
    return [str(i) for i in range(n)]


def load_splits(
    root: str | os.PathLike, data_format: str = "auto", splits: Sequence[str] = ("train", "val")
) -> tuple[dict[str, list[Sample]], list[str], str]:
    """The checked (image, mask) pairs of each split, the class names, and the layout found."""
    root, fmt = detect_format(root, data_format)
    found: dict[str, list[Sample]] = {}
    for split in splits:
        if fmt == "voc":
            samples, missing = voc_samples(root, split)
        else:
            if not (root / split).is_dir():
                raise DataError(
                    f"{root} has no {split}/ folder; the masks layout needs {root}/{split}/images/ and "
                    f"{root}/{split}/masks/"
                )
            samples, missing = mask_folder_samples(root / split)
        if missing:
            warnings.warn(
                f"{root} ({split}): skipped {len(missing)} image(s) without a mask, e.g. "
                f"{[p.name for p in missing[:3]]}",
                stacklevel=2,
            )
        if not samples:
            raise DataError(f"{root} ({split}) has no image with a mask")
        check_pairs(samples)
        found[split] = samples
    if fmt == "voc":
        classes = list(VOC_CLASSES)
    else:
        classes = read_classes(root) or infer_classes(found.get("train", []), found.get("val", []), root)
    for split, samples in found.items():  # a mask or two each, unless there is nothing to learn
        require_classes(readable_masks(samples, classes), classes, f"{root} ({split})")
    return found, classes, fmt


# ----------------------------------------------------------------------------- datasets and transforms


def train_transform(
    size: int,
    hflip: float = 0.5,
    scale: tuple[float, float] = SCALE_RANGE,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> v2.Compose:
    """Joint augmentation: short side to ``scale`` x ``size`` at random, a ``size`` crop padded with ignore, flip."""
    lo, hi = max(8, round(scale[0] * size)), max(9, round(scale[1] * size) + 1)
    return v2.Compose(
        [
            v2.RandomResize(lo, hi, antialias=True),
            v2.RandomCrop(size, pad_if_needed=True, fill={tv_tensors.Image: 0, tv_tensors.Mask: IGNORE_INDEX}),
            v2.RandomHorizontalFlip(hflip),
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


def eval_transform(mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> v2.Compose:
    """Full resolution: no resize, no crop; only the float conversion and the normalization."""
    return v2.Compose(
        [
            v2.ToDtype({tv_tensors.Image: torch.float32, tv_tensors.Mask: torch.int64}, scale=True),
            v2.Normalize(list(mean), list(std)),
        ]
    )


class SegmentationDataset(Dataset):
    """(image, mask) pairs as ``(float image (3, H, W), int64 mask (H, W))``, or ``(None, path)`` when unreadable.

    ``__getitem__`` takes an index or an ``(epoch, index)`` key; the augmentation seed is a function
    of (seed, epoch, index). ``lut`` (256 entries) re-numbers mask values, e.g. to a checkpoint's class order.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        classes: Sequence[str],
        transform: Callable | None = None,
        seed: int = 0,
        lut: np.ndarray | None = None,
    ) -> None:
        self.samples, self.classes = list(samples), list(classes)
        self.transform = transform if transform is not None else eval_transform()
        self.seed, self.epoch, self.lut = seed, 0, lut

    def __len__(self) -> int:
        return len(self.samples)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def read(self, index: int) -> tuple[Image.Image, np.ndarray] | None:
        """The upright image and its checked mask in the same frame (class indices, re-numbered by ``lut``),
        or None when either does not decode."""
        image_path, mask_path = self.samples[index]
        try:
            image, mask = load_image_and_mask(image_path, mask_path, decode_mask)
        except UnreadableImageError:
            return None
        check_mask_values(mask, len(self.classes), mask_path)
        return image, (self.lut[mask] if self.lut is not None else mask)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        pair = self.read(index)
        if pair is None:
            return None, str(self.samples[index][0])
        image = tv_tensors.Image(torch.from_numpy(np.asarray(pair[0]).copy()).permute(2, 0, 1))
        mask = tv_tensors.Mask(torch.from_numpy(pair[1].copy()))
        x, y = seeded(self.seed, epoch, index, self.transform, image, mask)
        return x.as_subclass(torch.Tensor), y.as_subclass(torch.Tensor)


def collate_masks(batch: list[tuple[Any, Any]]) -> tuple[Any, Any, list[str]]:
    """Stack images and masks of one size; differently sized ones (full-resolution validation) stay lists.

    Training crops always share one size, so the engine gets tensors; a validation batch of
    differently sized images comes as lists and is evaluated image by image.
    """
    good = [(x, y) for x, y in batch if x is not None]
    bad = [y for x, y in batch if x is None]
    if not good:
        return None, None, bad
    xs, ys = [x for x, _ in good], [y for _, y in good]
    if all(x.shape == xs[0].shape for x in xs):
        return torch.stack(xs), torch.stack(ys), bad
    return xs, ys, bad
