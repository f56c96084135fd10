"""Post-training static INT8 quantization of the fused graph with onnxruntime, and ONNX evaluation.

Re-parameterized networks are known to quantize badly (RepVGG lost tens of points of top-1):
folding k branches, a scale branch and an identity into one kernel gives kernels whose channels
have very different ranges, so one scale per tensor crushes most channels. The remedies are
per-channel weight scales, a calibration that ignores activation outliers, and keeping the most
sensitive layers (the first conv, which sees the raw image, and the classifier) in float.
:func:`quantization_study` measures each of these on held-out data so the defaults are chosen by
measurement (README, "Deployment").
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .export import export_model, onnx_session, read_onnx_metadata, require, set_onnx_metadata

log = logging.getLogger("mobileone")

CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
KEEP_FLOAT = ("none", "first", "last", "first_last")


@dataclass(frozen=True)
class QuantSettings:
    """One way to quantize: calibration method, weight scales, and which layers stay in float."""

    method: str = "minmax"
    per_channel: bool = True
    keep_float: str = "none"  # none | first | last | first_last: the first conv / the classifier
    reduce_range: bool = False  # 7-bit weights: avoids int16 overflow in x86 VPMADDUBSW kernels

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        if self.keep_float not in KEEP_FLOAT:
            raise ValueError(f"keep_float must be one of {KEEP_FLOAT}, got {self.keep_float!r}")

    def label(self) -> str:
        scales = "per-channel" if self.per_channel else "per-tensor"
        keep = "" if self.keep_float == "none" else f", {self.keep_float.replace('_', '+')} in float"
        return f"{self.method}, {scales}{keep}{', reduce-range' if self.reduce_range else ''}"


def _data_root(data: str | os.PathLike, split: str) -> Path:
    root = Path(data)
    if not root.is_dir():
        raise FileNotFoundError(f"data folder {root} does not exist (expected class folders, or train/ and val/)")
    return root / split if (root / split).is_dir() else root


def image_folder(data: str | os.PathLike, split: str, meta: dict[str, Any]) -> Any:
    """An ImageFolder of ``data`` (or its ``split``/ sub-folder) with the model's eval transform.

    Labels follow the model's class names when it has them, so folders in another order score right.
    """
    from .data import DataError, ImageFolderDataset, eval_transform

    size = int(meta["input_size"][-1])
    transform = eval_transform(size, float(meta.get("crop_pct", 0.875)), meta["mean"], meta["std"])
    ds = ImageFolderDataset(_data_root(data, split), transform=transform)
    classes = meta.get("class_names")
    if classes:
        unknown = sorted(set(ds.classes) - set(classes))
        if unknown:
            raise DataError(
                f"{ds.root} has class folders {unknown[:10]} the model does not know (its classes: "
                f"{list(classes)[:10]}...)"
            )
        remap = {ds.class_to_idx[c]: list(classes).index(c) for c in ds.classes}
        ds.samples = [(p, remap[t]) for p, t in ds.samples]
        ds.targets = [t for _, t in ds.samples]
    return ds


def calibration_images(data: str | os.PathLike, meta: dict[str, Any], num: int = 300, seed: int = 0) -> Tensor:
    """``num`` images drawn at random from ``data`` (its ``train/`` if there is one), preprocessed as deployed."""
    ds = image_folder(data, "train", meta)
    if len(ds) == 0:
        raise ValueError(f"no images in {ds.root} to calibrate on")
    idx = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))[:num].tolist()
    images = [ds[i][0] for i in idx]
    return torch.stack([x for x in images if x is not None])


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a tensor of images."""

    def __init__(self, images: Tensor, input_name: str, batch_size: int = 16) -> None:
        self.batches = [{input_name: b.numpy()} for b in images.split(batch_size)]
        self.it: Iterator = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)

    def rewind(self) -> None:
        self.it = iter(self.batches)


def _float_nodes(model_path: Path, keep_float: str) -> list[str]:
    """Names of the first conv and/or the classifier (last Gemm/MatMul/Conv) of the graph."""
    onnx = require("onnx")
    weighted = [n for n in onnx.load(str(model_path)).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    keep = []
    if keep_float in ("first", "first_last"):
        keep.append(weighted[0].name)
    if keep_float in ("last", "first_last"):
        keep.append(weighted[-1].name)
    return keep


def quantize_onnx(
    fp32_path: str | os.PathLike,
    out: str | os.PathLike,
    calibration: Tensor,
    settings: QuantSettings = QuantSettings(),
) -> Path:
    """Static INT8 (QDQ: int8 weights, uint8 activations) of an fp32 ONNX file, calibrated on ``calibration``.

    The fp32 file's metadata (classes, preprocessing) is copied, with the settings added.
    """
    quant = require("onnxruntime.quantization")
    onnx = require("onnx")
    fp32_path, out = Path(fp32_path), Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="mobileone_q_") as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant.quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=True)
        input_name = onnx.load(str(prepared)).graph.input[0].name
        method = {
            "minmax": quant.CalibrationMethod.MinMax,
            "entropy": quant.CalibrationMethod.Entropy,
            "percentile": quant.CalibrationMethod.Percentile,
        }[settings.method]
        quant.quantize_static(
            str(prepared),
            str(out),
            _Reader(calibration, input_name),
            quant_format=quant.QuantFormat.QDQ,
            per_channel=settings.per_channel,
            reduce_range=settings.reduce_range,
            activation_type=quant.QuantType.QUInt8,
            weight_type=quant.QuantType.QInt8,
            nodes_to_exclude=_float_nodes(prepared, settings.keep_float),
            calibrate_method=method,
            extra_options={"CalibTensorRangeSymmetric": False},
        )
    meta = read_onnx_metadata(fp32_path)
    proto = onnx.load(str(out))
    set_onnx_metadata(proto, {**meta, "quantization": {**asdict(settings), "calibration_images": len(calibration)}})
    onnx.save(proto, str(out))
    return out


def _onnx_batches(data: Any, meta: dict[str, Any], batch_size: int) -> Iterable[tuple[Tensor, Tensor]]:
    from torch.utils.data import DataLoader

    from .data import collate_skip_bad

    if isinstance(data, (str, os.PathLike)):
        loader = DataLoader(image_folder(data, "val", meta), batch_size, collate_fn=collate_skip_bad)
    else:
        loader = data
    for batch in loader:
        x, y = batch[0], batch[1]
        if x is not None:
            yield x, y


def evaluate_onnx(
    path: str | os.PathLike,
    data: Any,
    batch_size: int = 64,
    threads: int | None = None,
) -> dict[str, Any]:
    """Top-1 / top-5 of any ONNX classifier on ``data``: a folder (``val/`` if present) or a loader of (x, y).

    Preprocessing (size, crop, mean, std) and the class order are read from the file's metadata,
    as ``mobileone export`` writes it; files without it get ImageNet defaults at their input size.
    """
    session = onnx_session(path, threads)
    inp = session.get_inputs()[0]
    meta = read_onnx_metadata(path)
    size = inp.shape[-1] if isinstance(inp.shape[-1], int) else 224
    meta.setdefault("input_size", [3, size, size])
    meta.setdefault("mean", [0.485, 0.456, 0.406])
    meta.setdefault("std", [0.229, 0.224, 0.225])
    fixed_batch = inp.shape[0] if isinstance(inp.shape[0], int) else None
    n = top1 = top5 = 0
    t0 = time.perf_counter()
    for x, y in _onnx_batches(data, meta, batch_size):
        chunks = x.split(fixed_batch) if fixed_batch else [x]
        logits = torch.cat([torch.from_numpy(session.run(None, {inp.name: c.numpy()})[0]) for c in chunks])
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        n += len(y)
        top1 += int(hit[:, 0].sum())
        top5 += int(hit.any(1).sum())
    if n == 0:
        raise ValueError(f"no images were evaluated from {data}")
    return {
        "model": str(path),
        "images": n,
        "top1": 100.0 * top1 / n,
        "top5": 100.0 * top5 / n,
        "seconds": time.perf_counter() - t0,
        "quantization": meta.get("quantization"),
    }


def quantize_model(
    model: nn.Module,
    calib_data: str | os.PathLike,
    out: str | os.PathLike,
    settings: QuantSettings = QuantSettings(),
    img_size: int | None = None,
    num_calib: int = 300,
) -> tuple[Path, Path]:
    """Fuse and export ``model`` to fp32 ONNX beside ``out`` (``*.fp32.onnx``), then quantize it to ``out``."""
    out = Path(out)
    fp32 = out.with_name(out.stem + ".fp32.onnx")
    export_model(model, fp32, "onnx", img_size=img_size, dynamic_batch=True)
    calibration = calibration_images(calib_data, read_onnx_metadata(fp32), num_calib)
    return fp32, quantize_onnx(fp32, out, calibration, settings)


DEFAULT_STUDY = (
    QuantSettings("minmax", per_channel=False),
    QuantSettings("minmax", per_channel=True),
    QuantSettings("entropy", per_channel=True),
    QuantSettings("percentile", per_channel=True),
    QuantSettings("minmax", per_channel=True, keep_float="first_last"),
    QuantSettings("percentile", per_channel=True, keep_float="first_last"),
)


def quantization_study(
    fp32_path: str | os.PathLike,
    calib_data: str | os.PathLike,
    eval_data: Any,
    settings: Iterable[QuantSettings] = DEFAULT_STUDY,
    num_calib: int = 300,
    out_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Top-1 of the fp32 ONNX model and of its INT8 version under each of ``settings``, with the drop."""
    fp32_path = Path(fp32_path)
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="mobileone_study_"))
    calibration = calibration_images(calib_data, read_onnx_metadata(fp32_path), num_calib)
    base = evaluate_onnx(fp32_path, eval_data)
    rows = [
        {
            "settings": "fp32",
            "top1": base["top1"],
            "top5": base["top5"],
            "drop": 0.0,
            "size_kb": fp32_path.stat().st_size / 1024,
        }
    ]
    for i, s in enumerate(settings):
        q = quantize_onnx(fp32_path, out_dir / f"int8_{i}.onnx", calibration, s)
        r = evaluate_onnx(q, eval_data)
        rows.append(
            {
                "settings": s.label(),
                "top1": r["top1"],
                "top5": r["top5"],
                "drop": base["top1"] - r["top1"],
                "size_kb": q.stat().st_size / 1024,
                "path": str(q),
            }
        )
    return rows


def study_table(rows: list[dict[str, Any]]) -> str:
    """The study as a markdown table."""
    lines = ["| quantization | top-1 % | top-5 % | top-1 drop (points) | file KB |", "|---|---:|---:|---:|---:|"]
    lines += [
        f"| {r['settings']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['drop']:.2f} | {r['size_kb']:.0f} |" for r in rows
    ]
    return "\n".join(lines)
