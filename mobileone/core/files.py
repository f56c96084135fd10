"""Writing files so that a kill, a full disk or a concurrent reader never sees half of one.

One rule for every file the library writes: it is written beside its place under a temporary name
(``.<name>.<pid>-<random>.tmp<suffix>``), checked where there is something to check, then renamed
into place. A file already there is replaced only when it is one the library wrote (the caller
says how to recognise it). The temporaries a kill leaves are removed by the next write beside them
(when the process that wrote them is gone) or by the next run that locks the folder.
"""

from __future__ import annotations

import errno
import json
import os
import re
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Our temporaries: .<name>.<pid>-<random>.tmp<suffix> (the suffix kept: some writers insist on it).
_OURS = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[0-9a-f]{8}\.tmp(?P<suffix>\.[A-Za-z0-9]+)?$")
# Earlier versions' temporaries (.<name>.<mkstemp>.tmp) and those of safetensors' own writer (.tmpXXXXXX):
# removed only under a run directory's lock, where no other process writes.
_LEGACY = re.compile(r"^\.(.+\.tmp|tmp[A-Za-z0-9]{6})$")


class DiskFullError(OSError):
    """The device ran out of space while a file was written; the previous version of the file is intact."""


class NotOursError(FileExistsError):
    """A file the library would write is already there and is not one the library wrote: it is never replaced."""


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


def temporary_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name beside ``path`` that keeps its suffix and names this process."""
    path = Path(path)
    return path.with_name(f".{path.stem}.{os.getpid()}-{secrets.token_hex(4)}.tmp{path.suffix}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):  # another user's process; a pid out of range is nobody's
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def remove_stale_temporaries(folder: str | os.PathLike, locked: bool = True) -> list[Path]:
    """Delete the temporaries interrupted writes left in ``folder``; returns them.

    ``locked``: the caller holds the folder (a run directory's lock), so every temporary is stale.
    Otherwise only those whose process is gone are removed (another process may be writing).
    """
    stale = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return []
    for p in entries:
        m = _OURS.match(p.name)
        if (m and (locked or not _pid_alive(int(m["pid"])))) or (locked and _LEGACY.match(p.name)):
            _remove(p)
            stale.append(p)
    return stale


def atomic_write(
    path: str | os.PathLike,
    write: Callable[[str], None],
    previous: str | os.PathLike | None = None,
    replace_if: Callable[[Path], bool] | None = None,
) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it into place.

    A reader sees the old file or the new one, never a part. The new file gets the permissions
    the umask gives (as ``open()`` would); on a full disk the temporary file is removed and
    :class:`DiskFullError` says which file was kept. With ``previous``, the current ``path`` is
    moved there once the new file is complete. With ``replace_if``, an existing ``path`` is
    replaced only when ``replace_if(path)`` says it is the library's (else :class:`NotOursError`).
    """
    path = Path(path)
    if replace_if is not None:
        check_replaceable(path, replace_if)
    remove_stale_temporaries(path.parent, locked=False)
    tmp = temporary_path(path)
    try:
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
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
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # a private 0600 is meant for secrets, not results
        if previous is not None and path.exists():
            os.replace(path, previous)
        os.replace(tmp, path)
    except Exception as e:
        # torch.save and safetensors report a full disk as their own errors: check the device itself.
        if getattr(e, "errno", None) == errno.ENOSPC or _device_full(path.parent):
            raise DiskFullError(errno.ENOSPC, f"no space left on the device while writing {path}; {_kept(path)}") from e
        raise
    finally:
        if os.path.lexists(tmp):
            _remove(tmp)


def write_text(path: str | os.PathLike, text: str, replace_if: Callable[[Path], bool] | None = None) -> Path:
    """``text`` written atomically at ``path`` (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text), replace_if=replace_if)
    return Path(path)


def write_bytes(path: str | os.PathLike, data: bytes, replace_if: Callable[[Path], bool] | None = None) -> Path:
    """``data`` written atomically at ``path`` (see :func:`atomic_write`)."""
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(data), replace_if=replace_if)
    return Path(path)


# ---- what may be replaced

WRITTEN_BY = "written_by"  # the key our JSON results carry, so a later write knows it may replace them


def write_json_result(path: str | os.PathLike, result: dict[str, Any], command: str) -> Path:
    """A command's result as JSON at ``path``, marked as ours; never replaces a file that is not such a result."""
    text = json.dumps({**result, WRITTEN_BY: f"mobileone {command}"}, indent=2, default=str)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, text, replace_if=is_json_result)


def is_json_result(path: Path) -> bool:
    """Whether ``path`` is a JSON result the library wrote (:func:`write_json_result`), or empty."""
    try:
        if path.stat().st_size == 0:
            return True
        with open(path, "rb") as f:
            head = f.read(1)
        if head != b"{":
            return False
        value = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return False
    return isinstance(value, dict) and str(value.get(WRITTEN_BY, "")).startswith("mobileone ")


def check_replaceable(path: Path, ours: Callable[[Path], bool], fix: str = "") -> None:
    """Raise :class:`NotOursError` when ``path`` exists and ``ours(path)`` says the library did not write it."""
    if not os.path.lexists(path):
        return
    if path.is_dir() and not path.suffix:
        raise NotOursError(f"{path} is a folder; give a file name{fix}")
    if not ours(path):
        raise NotOursError(
            f"{path} already exists and was not written by mobileone ({describe(path)}); it is never replaced. "
            f"Move it away or choose another name{fix}"
        )


def describe(path: Path) -> str:
    """A few words on what a file is, for messages: 'a safetensors checkpoint', 'a JSON file', 'a folder'."""
    if path.is_dir():
        return "a folder"
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return "an unreadable file"
    if path.suffix == ".safetensors" or (len(head) >= 9 and head[8:9] == b"{"):
        return "a safetensors checkpoint"
    if head.startswith((b"PK\x03\x04", b"\x80")):
        return "a PyTorch file"
    if head.lstrip().startswith((b"{", b"[")):
        return "a JSON file"
    return f"{path.stat().st_size:,} bytes"


# ---- folders built once (dataset caches)


def atomic_folder(root: str | os.PathLike, build: Callable[[Path], None], done: str = "") -> Path:
    """Build a folder once: ``build(tmp)`` fills a temporary folder beside ``root``, which is renamed into place.

    ``root / done`` existing means the folder is complete (default: ``root`` itself). Concurrent
    first runs (several ranks) never see half of it; a folder a killed build left is removed by
    the next one. Returns ``root``.
    """
    root = Path(root)
    marker = root / done if done else root
    if marker.exists():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(root.parent, locked=False)
    tmp = temporary_path(root)
    tmp.mkdir()
    try:
        build(tmp)
        try:
            os.rename(tmp, root)
        except OSError:  # another process won the race; its folder is identical
            if not marker.exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root


def _kept(path: Path) -> str:
    return f"the previous {path} was kept" if path.exists() else f"{path} was not written"


def _device_full(folder: Path) -> bool:
    try:
        st = os.statvfs(folder)
    except (OSError, AttributeError):  # no statvfs on Windows
        return False
    return st.f_bavail * st.f_frsize < 1 << 20
