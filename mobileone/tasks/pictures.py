"""Pictures the library draws (predictions, masks, overlays): PNGs marked as ours, so a later run may replace them
and never replaces a picture of yours that happens to have the same name."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image, PngImagePlugin

from ..core.files import write_bytes

MARK = ("Software", "mobileone")


def is_our_picture(path: Path) -> bool:
    """Whether ``path`` is a PNG this library wrote (its text chunk says so)."""
    try:
        with Image.open(path) as img:
            return img.format == "PNG" and img.info.get(MARK[0]) == MARK[1]
    except (OSError, ValueError, SyntaxError):
        return False


def save_png(image: Image.Image, path: str | Path) -> Path:
    """``image`` as a PNG at ``path``, written atomically and marked; a file there that is not ours is kept."""
    info = PngImagePlugin.PngInfo()
    info.add_text(*MARK)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(path, buffer.getvalue(), replace_if=is_our_picture)
