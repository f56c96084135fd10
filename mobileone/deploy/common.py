"""What every export target shares: the one write path, the optional-dependency import, the errors, tensor
names, batching."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import json
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from ..core.files import check_replaceable, remove_stale_temporaries, temporary_path, writable_folder

INPUT_NAME, OUTPUT_NAME = "input", "logits"
# A loaded export: one batch in (normalized NCHW float32), the outputs in the PyTorch module's order out.
Runner = Callable[[Tensor], list[Tensor]]


class ExportError(RuntimeError):
    """The export failed, or the exported model does not reproduce the PyTorch model."""


class ExportCheckError(ExportError):
    """The exported file does not reproduce the PyTorch model: nothing was written at ``--out``."""


T = TypeVar("T")
FAILED = ".failed"  # NAME.failed.EXT: an export whose check failed, kept for inspection only


def failed_path(out: str | os.PathLike) -> Path:
    """Where an export whose check failed is kept: ``model.onnx`` -> ``model.failed.onnx``."""
    out = Path(out)
    return out.with_name(f"{out.stem}{FAILED}{out.suffix}")


def refuse_failed(path: str | os.PathLike) -> None:
    """Raise :class:`ExportError` for a file named as an export whose check failed (no runtime reads one)."""
    if Path(path).stem.endswith(FAILED):
        raise ExportError(
            f"{path} is an export whose check failed: it differs from the PyTorch model and is kept only for "
            "inspection. Export again (see the check's message), or fix the model"
        )


def write_checked(
    out: str | os.PathLike,
    write: Callable[[Path], None],
    check: Callable[[Path], T] | None = None,
    read_metadata: Callable[[Path], dict[str, Any]] | None = None,
    companions: Callable[[Path], list[Path]] | None = None,
) -> T | None:
    """The one way every export target writes ``out``: ``write(tmp)`` beside it, ``check(tmp)``, then renamed.

    ``tmp`` keeps ``out``'s suffix (a file or a ``.mlpackage`` folder). An :class:`ExportError` from
    writing or checking leaves nothing at ``out`` (a previous file there stays): the file is kept as
    ``NAME.failed.EXT`` and :class:`ExportCheckError` says so. Any other error removes it. An existing
    ``out`` is replaced only when ``read_metadata`` reads it as one of our exports; returns ``check``'s result.
    ``companions(path)``: the files written beside an export at ``path`` (OpenVINO's ``.bin``, ncnn's ``.bin``,
    a JSON of metadata), moved with it.
    """
    out = Path(out)
    writable_folder(out.parent, "; choose another --out")
    check_replaceable(out, lambda p: _is_export(p, read_metadata), "; choose another --out")
    remove_stale_temporaries(out.parent, locked=False)
    tmp = temporary_path(out)
    try:
        write(tmp)
        result = check(tmp) if check is not None else None
    except ExportError as e:
        failed = failed_path(out)
        if os.path.lexists(tmp):
            _move_all(tmp, failed, companions)
        message = str(e).replace(str(tmp), str(failed))
        raise ExportCheckError(f"{message}. Nothing was written at {out}; the file is kept as {failed}") from e
    except BaseException:
        for path in [tmp, *(companions(tmp) if companions else [])]:
            _remove(path)
        raise
    _move_all(tmp, out, companions)
    return result


def companion_name(path: Path, companion: Path, dst: Path) -> Path:
    """Where ``companion`` of an export at ``path`` goes when the export moves to ``dst``."""
    if companion.name.startswith(path.name):  # model.tflite.json
        return dst.parent / (dst.name + companion.name[len(path.name) :])
    return dst.with_suffix(companion.suffix)  # model.bin beside model.xml


def _move_all(src: Path, dst: Path, companions: Callable[[Path], list[Path]] | None) -> None:
    for companion in companions(src) if companions else []:
        if os.path.lexists(companion):
            _move(companion, companion_name(src, companion, dst))
    _move(src, dst)


def _is_export(path: Path, read_metadata: Callable[[Path], dict[str, Any]] | None) -> bool:
    """Whether ``path`` is an export this library wrote (its metadata describes the preprocessing)."""
    if read_metadata is None:
        return False
    try:
        return "input_layout" in read_metadata(path)
    except Exception:  # not readable as this format: not ours
        return False


def _move(src: Path, dst: Path) -> None:
    """Rename a file or a folder (a ``.mlpackage``) onto ``dst``, replacing what is there."""
    if dst.is_dir() and not dst.is_symlink():
        old = temporary_path(dst)
        os.rename(dst, old)
        os.rename(src, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(src, dst)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        path.unlink()


# Loggers of third-party packages that print on import what our users cannot act on: coremltools on
# Linux ("Failed to load _MLModelProxy", version notes), torch's pytree deprecation notice that
# executorch's dependencies trigger.
NOISY_LOGGERS = ("coremltools", "torch.utils._pytree")
# Lines that ExecuTorch's native runtime writes straight to stderr while probing the CPU.
# LiteRT's converter and interpreter log through absl / TensorFlow straight to stderr as well.
NATIVE_NOISE = (
    "[cpuinfo_utils.cpp:",
    "[threadpool.cpp:",
    "WARNING: All log messages before absl::InitializeLog()",
    "I0000 ",
    "W0000 ",
    "INFO: Created TensorFlow Lite",
)


@contextlib.contextmanager
def quiet_imports() -> Iterator[None]:
    """Silence the import-time chatter of ``NOISY_LOGGERS`` (their errors still show)."""
    loggers = [logging.getLogger(name) for name in NOISY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def filtered_native_stderr(noise: tuple[str, ...] = NATIVE_NOISE) -> Iterator[None]:
    """Run a block with the process's stderr (file descriptor 2) captured, then re-emit all but ``noise`` lines.

    Native libraries print with C's stdio, which Python's ``sys.stderr`` never sees.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            kept = [
                ln
                for ln in capture.read().decode(errors="replace").splitlines(keepends=True)
                if not ln.startswith(noise)
            ]
            sys.stderr.write("".join(kept))


@contextlib.contextmanager
def silenced_stdout() -> Iterator[None]:
    """Run a block with standard output (Python's and file descriptor 1) discarded: converters that narrate."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(os.devnull, "w") as null, contextlib.redirect_stdout(null):
        os.dup2(null.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


class _SignalStack(ctypes.Structure):
    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def keeps_signal_stack(fn: Callable[..., T]) -> Callable[..., T]:
    """Run ``fn`` and put the calling thread's alternate signal stack back as it was.

    OpenVINO's CPU plugin installs an alternate signal stack on the thread that compiles or runs a
    model and can free it while it is still installed; the next signal delivered to a Python handler
    on that thread (the SIGCHLD of a finished subprocess, which PyTorch's data loader listens to;
    Ctrl-C) then kills the process with a segmentation fault. Linux only; elsewhere ``fn`` as is.
    """
    if not sys.platform.startswith("linux"):
        return fn
    libc = ctypes.CDLL(None, use_errno=True)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        saved = _SignalStack()
        libc.sigaltstack(None, ctypes.byref(saved))
        try:
            return fn(*args, **kwargs)
        finally:
            libc.sigaltstack(ctypes.byref(saved), None)

    return wrapper


def require(module: str, extra: str = "export") -> Any:
    """Import an optional dependency, or say which extra installs it."""
    try:
        with quiet_imports(), filtered_native_stderr():
            return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module.split('.')[0]} is needed for this and is not installed: pip install 'mobileone[{extra}]'"
        ) from e


def sidecar(path: str | Path) -> Path:
    """The JSON file beside an export whose format has no place for metadata (``model.tflite.json``)."""
    return Path(f"{path}.json")


def write_sidecar(path: str | Path, meta: dict[str, Any]) -> None:
    sidecar(path).write_text(json.dumps(meta, indent=2))


def read_sidecar(path: str | Path) -> dict[str, Any]:
    try:
        return json.loads(sidecar(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ExportError(f"cannot read the metadata of {path} from {sidecar(path)}: {e}") from e


def run_batches(run: Callable[[Tensor], Tensor], x: Tensor, dynamic_batch: bool) -> Tensor:
    """Run all of ``x`` at once if the export takes any batch size, else image by image."""
    if dynamic_batch:
        return run(x)
    return torch.cat([run(x[i : i + 1]) for i in range(len(x))])


def package_version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "?"
