"""Dataset identity checks, in one place for every format of every task.

A dataset can be wrong in ways no single file shows: two images under one id, two classes under
one name, label files that match no image, a split with nothing to learn (no boxes; masks of
only background and ignore). Each is refused here with a message that names the files and the fix,
instead of training on merged, shifted or empty targets. Text files are read as annotation tools
write them (UTF-8, with or without a byte-order mark).
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..engine.task import DataError
from .segment.model import IGNORE_INDEX


def read_text(path: str | Path) -> str:
    """A text file as UTF-8, its byte-order mark (Windows tools write one) removed."""
    try:
        return Path(path).read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from e
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror or e})") from e


def refuse_duplicates(items: Iterable[Hashable], what: str, where: str, fix: str) -> None:
    """A DataError naming up to 5 ``items`` that occur more than once."""
    counts = Counter(items)
    repeated = [item for item, n in counts.items() if n > 1]
    if repeated:
        shown = ", ".join(f"{item!r} ({counts[item]}x)" for item in repeated[:5])
        more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
        raise DataError(f"{where}: {len(repeated)} {what} occur more than once: {shown}{more}; {fix}")


def check_class_names(names: Sequence[str], where: str) -> list[str]:
    """Class names as given, refused when one is blank or repeated (two labels would share a name)."""
    refuse_duplicates(
        names, "class names", where, "each class needs a name of its own (merge the classes or rename one)"
    )
    return list(names)


def read_names(path: str | Path) -> list[str]:
    """One class name per non-blank line, surrounding spaces removed; every line is a name (``#1`` included:
    classes.txt, obj.names and labels.txt have no comment syntax), repeated names refused."""
    names = [line.strip() for line in read_text(path).splitlines() if line.strip()]
    return check_class_names(names, str(path))


def pair_by_stem(
    images: Sequence[Path], images_root: Path, targets: Sequence[Path], targets_root: Path, what: str
) -> tuple[dict[Path, Path], list[Path]]:
    """Each image's target file (same relative path and stem), and the target files that match no image.

    The suffix of either side is free (``a.jpg`` <-> ``a.png``, ``a.TXT``), and a stem that matches in
    another letter case only is taken when that match is unique. Two images of one stem would share
    one target: refused, naming them.
    """

    def key(path: Path, root: Path) -> str:
        return path.relative_to(root).with_suffix("").as_posix()

    refuse_duplicates(
        [key(p, images_root) for p in images],
        "image stems",
        str(images_root),
        f"two images of one name would share one {what}; rename one of each pair",
    )
    exact = {key(t, targets_root): t for t in targets}
    folded: dict[str, list[Path]] = {}
    for k, t in exact.items():
        folded.setdefault(k.lower(), []).append(t)
    pairs: dict[Path, Path] = {}
    for image in images:
        k = key(image, images_root)
        match = exact.get(k) or (folded[k.lower()][0] if len(folded.get(k.lower(), [])) == 1 else None)
        if match is not None:
            pairs[image] = match
    used = set(pairs.values())
    return pairs, [t for t in targets if t not in used]


def warn_unmatched(unmatched: Sequence[Path], folder: Path, what: str, rule: str) -> None:
    """One warning naming target files that belong to no image (they are not used)."""
    if unmatched:
        names = ", ".join(p.relative_to(folder).as_posix() for p in unmatched[:5])
        more = ", ..." if len(unmatched) > 5 else ""
        warnings.warn(
            f"{folder}: {len(unmatched)} {what} match no image and are not used: {names}{more} ({rule})", stacklevel=3
        )


def require_boxes(records: Sequence[Any], source: str, hint: str = "") -> None:
    """A detection split must hold at least one box to train on or score: refused otherwise."""
    boxes = sum(int((~r.crowd).sum()) for r in records)
    if boxes == 0:
        raise DataError(
            f"{source}: none of its {len(records)} images has a box to train on or score (nothing to learn); "
            f"check that the annotations are where the layout expects them{hint}"
        )


def require_classes(masks: Iterable[np.ndarray], classes: Sequence[str], source: str) -> None:
    """Masks must hold at least two classes besides the ignore index (else nothing is learnt or scored).

    Stops reading at the second class found, so a normal dataset costs a mask or two.
    """
    seen: set[int] = set()
    read, ignore = 0, False
    for mask in masks:
        read += 1
        values = np.unique(mask)
        ignore = ignore or bool((values == IGNORE_INDEX).any())
        seen.update(int(v) for v in values if v != IGNORE_INDEX)
        if len(seen) >= 2:
            return
    names = [f"{v} ({classes[v]!r})" if v < len(classes) else str(v) for v in sorted(seen)]
    held = f"only class {names[0]}" if names else "no class at all"
    hint = (
        f" Binary masks saved as 0/{IGNORE_INDEX} mark every object pixel 'ignore': save objects as 1 (e.g. "
        f"(np.asarray(mask) == {IGNORE_INDEX}).astype(np.uint8)), {IGNORE_INDEX} meaning 'ignore' only"
        if ignore and sorted(seen) in ([], [0])
        else ""
    )
    raise DataError(
        f"{source}: its {read} masks hold {held} besides the ignore index {IGNORE_INDEX}, so there is nothing "
        f"to learn or score (mIoU needs 2 classes or more).{hint}"
    )
