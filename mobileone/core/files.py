"""Writing files so that a kill, a full disk or a concurrent reader never sees half of one."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


class DiskFullError(OSError):
    """The device ran out of space while a file was written; the previous version of the file is intact."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file; mkstemp's 0600 is for secrets


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A reader sees the old file or the new one, never a part. The new file gets the permissions
    the umask gives; on a full disk the temporary file is removed and :class:`DiskFullError`
    says which file was kept.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"cannot write {path}: its folder {path.parent} does not exist") from e
    except PermissionError as e:
        raise PermissionError(f"cannot write {path}: {path.parent} is not writable (permission denied)") from e
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except Exception as e:
        # torch.save and safetensors report a full disk as their own errors: check the device itself.
        if getattr(e, "errno", None) == errno.ENOSPC or _device_full(path.parent):
            kept = f"the previous {path.name} was kept" if path.exists() else f"{path.name} was not written"
            raise DiskFullError(errno.ENOSPC, f"no space left on the device while writing {path}; {kept}") from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _device_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_write` left in ``folder``; returns them."""
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
