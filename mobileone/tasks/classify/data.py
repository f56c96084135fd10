"""Images in, tensors out: ImageFolder trees that survive real-world files, the built-in dataset, transforms.

Users' folders hold CMYK JPEGs, 16-bit PNGs, palette GIF-likes, rotated phone photos, half-copied
files, decompression bombs, stray ``Thumbs.db``, hidden ``.ipynb_checkpoints`` and ``._x.jpg``
files, and symlinks (loops included); none of that may crash a data-loader worker or become a
class. :func:`load_image` (``mobileone.tasks.images``, the one image reader of every task) raises
:class:`UnreadableImageError` for anything it cannot decode. Bad files come back as ``None``
samples that :func:`collate_skip_bad` drops and counts, so the training loop can warn, record
the count in its metrics, or stop with the file's name (``strict``). :func:`scan_image_tree`
lists a folder's images the way every task should: hidden entries skipped, each real folder
read once however many links lead to it.

Augmentation is seeded per sample from (seed, epoch, index), so the same image gets the same
crop whatever the number of processes or workers: a 2-process run sees exactly the batches of
a 1-process run, and a resumed run the batches of an uninterrupted one. The training loader
passes ``(epoch, index)`` keys (``engine.distributed.EpochSampler``), because persistent worker
processes hold their own copy of the dataset and never see ``set_epoch``.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder
from torchvision.datasets.folder import IMG_EXTENSIONS

from ...core.config import IMAGENET_MEAN, IMAGENET_STD
from ...core.files import atomic_folder
from ...engine.distributed import seeded
from ...engine.task import DataError
from ..images import UnreadableImageError, load_image


def is_hidden(name: str) -> bool:
    """Names that are never data: dot files and folders (``.DS_Store``, ``._x.jpg``, ``.ipynb_checkpoints``)
    and the ``__MACOSX`` folder of zips made on macOS."""
    return name.startswith(".") or name == "__MACOSX"


@dataclass
class TreeScan:
    """The files under a folder, and what was left out and why."""

    files: list[Path] = field(default_factory=list)
    hidden: list[Path] = field(default_factory=list)  # dot files and folders, __MACOSX
    repeated: list[Path] = field(default_factory=list)  # links to a folder that was already read
    broken: list[Path] = field(default_factory=list)  # links to nothing

    def warn(self, root: Path) -> None:
        """One warning per kind of skipped entry, with a few examples."""
        for items, what in (
            (self.hidden, "hidden entries (names starting with '.', __MACOSX)"),
            (self.repeated, "links to folders that were already read (a link loop?)"),
            (self.broken, "broken links"),
        ):
            if items:
                examples = ", ".join(str(p) for p in items[:3]) + (", ..." if len(items) > 3 else "")
                warnings.warn(f"{root}: skipped {len(items)} {what}: {examples}", stacklevel=3)


def scan_image_tree(folder: str | os.PathLike, scan: TreeScan | None = None, seen: set | None = None) -> TreeScan:
    """All files under ``folder`` in sorted order, following links but entering each real folder once.

    ``seen`` holds the (device, inode) keys of folders already read, or read on their own (the
    other class folders): a link into one of them is skipped, not read twice or mixed in; it is
    updated with every folder read. ``folder`` itself is always read. Pass one ``scan`` to several
    calls to collect everything in one place.
    """
    scan = scan if scan is not None else TreeScan()
    seen = seen if seen is not None else set()
    root = Path(folder)
    key = _folder_key(root)
    if key is None:
        return scan
    seen.add(key)
    stack = [root]
    while stack:
        current = stack.pop()
        try:
            entries = sorted(os.scandir(current), key=lambda e: e.name)
        except OSError:  # vanished or unreadable folder: nothing to read
            continue
        folders = []
        for e in entries:
            path = Path(e.path)
            if is_hidden(e.name):
                scan.hidden.append(path)
            elif e.is_dir():  # follows links
                sub = _folder_key(path)
                if sub in seen:
                    scan.repeated.append(path)
                else:
                    seen.add(sub)
                    folders.append(path)
            elif e.is_file():
                scan.files.append(path)
            elif e.is_symlink():
                scan.broken.append(path)
        stack.extend(reversed(folders))  # depth first, in name order
    return scan


def _folder_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


class ImageFolderDataset(ImageFolder):
    """torchvision's ImageFolder with clear errors up front and bad images skipped, not fatal.

    Class folders are the visible sub-folders of ``root``; files are found by
    :func:`scan_image_tree` (hidden entries skipped, each real folder read once), with a warning
    for everything left out. ``__getitem__`` takes an index or an ``(epoch, index)`` key and
    returns ``(tensor, label)``, or ``(None, path)`` for a file that fails to decode. The
    augmentation seed is a function of (seed, epoch, index); ``set_epoch`` sets the epoch plain
    indices use.
    """

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None, seed: int = 0) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist (expected {root}/<class name>/<images>)")
        self._scan = TreeScan()
        super().__init__(str(root), transform=transform, loader=load_image, allow_empty=True)
        self._scan.warn(root)
        exts = tuple(IMG_EXTENSIONS)
        others = [f for f in self._scan.files if f.suffix.lower() not in exts]
        if others:
            warnings.warn(
                f"{root}: skipping {len(others)} file(s) that are not images ({', '.join(str(f) for f in others[:3])}"
                f"{', ...' if len(others) > 3 else ''}); image extensions are {', '.join(exts)}",
                stacklevel=2,
            )
        self._scan = TreeScan()  # the images are in self.samples: data workers need no second list of every file
        counts = np.bincount([t for _, t in self.samples], minlength=len(self.classes))
        empty = [c for c, n in zip(self.classes, counts, strict=True) if n == 0]
        if empty and self.samples:
            warnings.warn(f"{root}: class folder(s) {empty} hold no images and get no training samples", stacklevel=2)
        if not self.samples:
            raise DataError(f"{root} holds no images at all (extensions {', '.join(exts)})")
        self.seed, self.epoch = seed, 0

    def find_classes(self, directory: str | os.PathLike) -> tuple[list[str], dict[str, int]]:
        """The visible sub-folders of ``directory`` (links to folders included), sorted."""
        entries = list(os.scandir(directory))
        self._scan.hidden += [Path(e.path) for e in entries if is_hidden(e.name)]
        classes = sorted(e.name for e in entries if not is_hidden(e.name) and e.is_dir())
        if not classes:
            raise DataError(f"{directory} has no class sub-folders; expected one folder of images per class")
        return classes, {c: i for i, c in enumerate(classes)}

    def make_dataset(
        self,
        directory: str | os.PathLike,
        class_to_idx: dict[str, int],
        extensions: tuple[str, ...] | None = None,
        is_valid_file: Callable[[str], bool] | None = None,
        allow_empty: bool = False,
    ) -> list[tuple[str, int]]:
        """(path, label) of every image under each class folder; what was skipped goes to ``self._scan``."""
        exts = tuple(IMG_EXTENSIONS)
        folders = {c: Path(directory, c) for c in class_to_idx}
        keys = {c: _folder_key(p) for c, p in folders.items()}
        seen = {*keys.values(), _folder_key(Path(directory))}  # links into another class are not followed
        first: dict[Any, str] = {}
        samples = []
        for c, label in class_to_idx.items():
            if keys[c] in first:  # two class names for one real folder: its images get the first name only
                self._scan.repeated.append(folders[c])
                continue
            first[keys[c]] = c
            n = len(self._scan.files)
            scan_image_tree(folders[c], self._scan, seen)
            samples += [(str(f), label) for f in self._scan.files[n:] if f.suffix.lower() in exts]
        return samples

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[Any, Any]:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        path, target = self.samples[index]
        try:
            img = self.loader(path)
        except UnreadableImageError:
            return None, path
        if self.transform is None:
            return img, target
        return seeded(self.seed, epoch, index, self.transform, img), target


class ImageFilesDataset(Dataset):
    """Every image under a folder in any layout (flat, class folders, nested): what needs images but no labels
    (INT8 calibration). Items are ``(tensor, path)``, or ``(None, path)`` for a file that does not decode;
    files are found as :func:`scan_image_tree` finds them, with a warning for what was left out."""

    def __init__(self, root: str | os.PathLike, transform: Callable | None = None) -> None:
        root = Path(root)
        if not root.is_dir():
            raise DataError(f"image folder {root} does not exist")
        scan = scan_image_tree(root)
        scan.warn(root)
        exts = tuple(IMG_EXTENSIONS)
        self.root, self.transform = root, transform
        self.files = [f for f in scan.files if f.suffix.lower() in exts]
        if not self.files:
            raise DataError(f"{root} holds no images (extensions {', '.join(exts)}), in it or in any sub-folder")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[Any, str]:
        path = self.files[index]
        try:
            img = load_image(path)
        except UnreadableImageError:
            return None, str(path)
        return (self.transform(img) if self.transform else img), str(path)


def collate_skip_bad(batch: list[tuple[Any, Any]]) -> tuple[torch.Tensor | None, torch.Tensor | None, list[str]]:
    """Stack the good samples; return the paths of the bad ones beside them."""
    good = [(x, y) for x, y in batch if x is not None]
    bad = [y for x, y in batch if x is None]
    if not good:
        return None, None, bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad


def check_splits(train: ImageFolder, val: ImageFolder) -> None:
    """``val/`` must hold the classes of ``train/``, in the same order, or labels silently mean other things."""
    if train.classes != val.classes:
        only_train = sorted(set(train.classes) - set(val.classes))
        only_val = sorted(set(val.classes) - set(train.classes))
        raise DataError(
            f"train/ and val/ have different class folders: only in train/: {only_train[:10]}, only in val/: "
            f"{only_val[:10]}; make both hold the same class names (an empty folder is allowed in val/)"
        )


def train_transform(
    img_size: int,
    crop_scale: tuple[float, float] = (0.08, 1.0),
    hflip: float = 0.5,
    augment: str = "none",
    magnitude: float = 0.0,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> T.Compose:
    """Random-resized-crop and flip, then RandAugment/AutoAugment at ``magnitude`` (0..30) if asked."""
    steps: list[Callable] = [T.RandomResizedCrop(img_size, scale=tuple(crop_scale), antialias=True)]
    if hflip > 0:
        steps.append(T.RandomHorizontalFlip(hflip))
    if augment == "randaugment" and magnitude > 0:
        steps.append(T.RandAugment(num_ops=2, magnitude=round(magnitude)))
    elif augment == "autoaugment" and magnitude > 0:
        steps.append(T.AutoAugment(T.AutoAugmentPolicy.IMAGENET))
    elif augment not in ("none", "randaugment", "autoaugment"):
        raise ValueError(f"augment must be none, randaugment or autoaugment, got {augment!r}")
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def eval_transform(
    img_size: int,
    crop_pct: float = 0.875,
    mean: tuple[float, ...] = IMAGENET_MEAN,
    std: tuple[float, ...] = IMAGENET_STD,
) -> T.Compose:
    """The standard evaluation transform: short side to ``img_size / crop_pct``, centre crop ``img_size``."""
    if not 0 < crop_pct <= 1:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return T.Compose(
        [
            T.Resize(int(img_size / crop_pct), antialias=True),
            T.CenterCrop(img_size),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )


def digits_split(val_fraction: float = 0.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits (1,797 real 8x8 scans, 10 classes) as a fixed stratified split.

    Returns ``train_images, train_labels, val_images, val_labels`` with images as uint8 (N, 8, 8).
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = np.clip(d.images * (255.0 / 16.0) + 0.5, 0, 255).astype(np.uint8)
    xt, xv, yt, yv = train_test_split(images, d.target, test_size=val_fraction, random_state=seed, stratify=d.target)
    return xt, yt, xv, yv


def default_cache_dir() -> Path:
    return Path(os.environ.get("MOBILEONE_CACHE", Path.home() / ".cache" / "mobileone"))


def builtin_dataset(root: str | os.PathLike | None = None) -> Path:
    """Write the bundled digits once as ``train/`` and ``val/`` ImageFolder trees; return their parent.

    Nothing is downloaded: the images ship inside scikit-learn. The tree is written to a temporary
    folder and renamed into place, so concurrent first runs (several ranks) never see half of it.
    """
    root = Path(root) if root is not None else default_cache_dir() / "digits"
    return atomic_folder(root, _write_digits, done="val")


def _write_digits(folder: Path) -> None:
    xt, yt, xv, yv = digits_split()
    for split, xs, ys in (("train", xt, yt), ("val", xv, yv)):
        for i, (x, y) in enumerate(zip(xs, ys, strict=True)):
            (folder / split / str(y)).mkdir(parents=True, exist_ok=True)
            Image.fromarray(x, "L").save(folder / split / str(y) / f"{i:04d}.png")
