"""Writing files so that a kill, a full disk or a concurrent reader never sees half of one."""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


class DiskFullError(OSError):
    """The device ran out of space while a file was written; the previous version of the file is intact."""


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``/proc``), else set and restored."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def writable_folder(folder: str | os.PathLike, hint: str = "") -> Path:
    """Create ``folder`` (and its parents) and check that files can be written in it.

    Raises a ``PermissionError`` / ``NotADirectoryError`` that names the folder, with ``hint``
    (e.g. "; choose another --out") appended, instead of an exporter's deep traceback.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as e:
        raise NotADirectoryError(f"cannot write into {folder}: a file is in the way of that folder{hint}") from e
    except OSError as e:  # permission denied, read-only file system
        raise PermissionError(f"cannot create the folder {folder}: {e.strerror or e}{hint}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise PermissionError(f"{folder} is not writable (read-only, or owned by another user){hint}")
    return folder


def atomic_write(
    path: str | os.PathLike, write: Callable[[str], None], previous: str | os.PathLike | None = None
) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A reader sees the old file or the new one, never a part. The new file gets the permissions
    the umask gives (as ``open()`` would); on a full disk the temporary file is removed and
    :class:`DiskFullError` says which file was kept. A kill leaves at most a hidden
    ``.<name>.*.tmp`` beside ``path``, which :func:`remove_stale_temporaries` deletes. With
    ``previous``, the current ``path`` is moved there once the new file is complete.
    """
    path = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except FileNotFoundError as e:
        raise FileNotFoundError(f"cannot write {path}: its folder {path.parent} does not exist") from e
    except PermissionError as e:
        raise PermissionError(f"cannot write {path}: {path.parent} is not writable (permission denied)") from e
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFullError(errno.ENOSPC, f"no space left on the device to write {path}; {_kept(path)}") from e
        raise
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp's 0600 is meant for secrets, not results
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except Exception as e:
        # torch.save and safetensors report a full disk as their own errors: check the device itself.
        if getattr(e, "errno", None) == errno.ENOSPC or _device_full(path.parent):
            raise DiskFullError(errno.ENOSPC, f"no space left on the device while writing {path}; {_kept(path)}") from e
        raise
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _kept(path: Path) -> str:
    return f"the previous {path} was kept" if path.exists() else f"{path} was not written"


def _device_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return False
    return st.f_bavail * st.f_frsize < 1 << 20


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files an interrupted :func:`atomic_write` left in ``folder``; returns them.

    Call it only while no other process writes into ``folder`` (the run directory's lock).
    """
    stale = [p for p in Path(folder).glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
