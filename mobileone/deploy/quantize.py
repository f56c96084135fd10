"""Post-training static INT8 quantization of the fused graph with onnxruntime.

Re-parameterized networks are known to quantize badly (RepVGG lost tens of points of top-1):
folding k branches, a scale branch and an identity into one kernel gives kernels whose output
channels have very different ranges, so one weight scale per tensor crushes most channels. On
the built-in digits, S0 loses 64 points with per-tensor scales and none with per-channel ones
(README, "Deployment"). :func:`quantization_study` measures each remedy on held-out data; the
defaults are what it found best: per-channel weights, MinMax calibration with averaged per-batch
extremes, and the stem and first block (the inputs with the widest channel ranges) in float.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor, nn

from .calibration import calibration_batch
from .common import require
from .evaluate_onnx import accuracy, onnx_logits
from .export import export_model, model_metadata
from .onnx import read_onnx_metadata, set_onnx_metadata

log = logging.getLogger("mobileone")

# minmax-avg: MinMax with the per-batch extremes averaged (onnxruntime's CalibMovingAverage),
# which damps single outlier images. onnxruntime's entropy calibrator uses 128 histogram bins
# for 128 quantized bins, which leaves it no threshold to choose: it gives MinMax's ranges.
CALIBRATION_METHODS = ("minmax", "minmax-avg", "entropy", "percentile")
# Layers that can stay in float, joined with "+": the first conv (``first``) or the first N
# weight layers (``first3``: in MobileOne the stem and the first block, whose inputs have the
# widest per-channel activation ranges), the classifier (``last``), all depthwise convs.
KEEP_FLOAT = ("first", "firstN", "last", "depthwise")


@dataclass(frozen=True)
class QuantSettings:
    """One way to quantize: calibration method, weight scales, and which layers stay in float."""

    method: str = "minmax-avg"
    per_channel: bool = True
    keep_float: str = "first3"  # "none" or "+"-joined KEEP_FLOAT: first convs, classifier, depthwise convs
    reduce_range: bool = False  # 7-bit weights: avoids int16 overflow in x86 VPMADDUBSW kernels

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(f"calibration method must be one of {CALIBRATION_METHODS}, got {self.method!r}")
        parts = [re.sub(r"^first\d+$", "firstN", p) for p in self.keep_float.split("+")]
        if self.keep_float != "none" and not set(parts) <= set(KEEP_FLOAT):
            raise ValueError(
                f"keep_float must be 'none' or a '+'-joined subset of {KEEP_FLOAT}, got {self.keep_float!r}"
            )

    def label(self) -> str:
        scales = "per-channel" if self.per_channel else "per-tensor"
        keep = "" if self.keep_float == "none" else f", {self.keep_float} in float"
        return f"{self.method}, {scales}{keep}{', reduce-range' if self.reduce_range else ''}"


def calibration_images(data: str | os.PathLike, meta: dict[str, Any], num: int = 300, seed: int = 0) -> Tensor:
    """``num`` images drawn at random from any folder of images (its ``train/`` if there is one), as deployed."""
    return calibration_batch(data, meta, num, seed)


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over a tensor of images."""

    def __init__(self, images: Tensor, input_name: str) -> None:
        # Equal batches: the histogram calibrators (entropy, percentile) stack them into one array.
        size = next(b for b in (16, 12, 10, 8, 6, 5, 4, 3, 2, 1) if len(images) % b == 0)
        self.batches = [{input_name: b.numpy()} for b in images.split(size)]
        self.it: Iterator = iter(self.batches)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.it, None)

    def rewind(self) -> None:
        self.it = iter(self.batches)


def _float_nodes(model_path: Path, keep_float: str, positions: list[int] = ()) -> list[str]:
    """Names of the nodes ``keep_float`` names (the first convs, the classifier, the depthwise convs) and of the
    weighted nodes at ``positions``."""
    onnx = require("onnx")
    parts = set(keep_float.split("+")) - {"none"}
    weighted = [n for n in onnx.load(str(model_path)).graph.node if n.op_type in ("Conv", "Gemm", "MatMul")]
    keep = []
    first = max([1 if p == "first" else int(p[5:]) for p in parts if re.fullmatch(r"first\d*", p)], default=0)
    if len(positions) and max(positions) >= len(weighted):
        raise ValueError(f"{model_path} has {len(weighted)} weighted nodes, no node {max(positions)} to keep in float")
    keep += [n.name for n in weighted[:first]] + [weighted[i].name for i in positions]
    if "last" in parts:
        keep.append(weighted[-1].name)
    if "depthwise" in parts:
        group = {n.name: next((a.i for a in n.attribute if a.name == "group"), 1) for n in weighted}
        keep += [n.name for n in weighted if group[n.name] > 1]
    return keep


def quantize_onnx(
    fp32_path: str | os.PathLike,
    out: str | os.PathLike,
    calibration: Tensor,
    settings: QuantSettings = QuantSettings(),
    exclude: list[int] | None = None,
) -> Path:
    """Static INT8 (QDQ: int8 weights, uint8 activations) of an fp32 ONNX file, calibrated on ``calibration``.

    ``exclude``: positions among the weighted nodes (Conv, Gemm, MatMul, in graph order) also kept in
    float. The fp32 file's metadata (classes, preprocessing) is copied, with the settings added.
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
            "minmax-avg": quant.CalibrationMethod.MinMax,
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
            nodes_to_exclude=_float_nodes(prepared, settings.keep_float, exclude or []),
            calibrate_method=method,
            extra_options={"CalibTensorRangeSymmetric": False, "CalibMovingAverage": settings.method == "minmax-avg"},
        )
    meta = read_onnx_metadata(fp32_path)
    quantization = {**asdict(settings), **meta.get("quantization", {}), "calibration_images": len(calibration)}
    proto = onnx.load(str(out))
    set_onnx_metadata(proto, {**meta, "quantization": quantization})
    onnx.save(proto, str(out))
    return out


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
    size = img_size if img_size is not None else int((getattr(model, "preprocess", None) or {}).get("input_size", 224))
    calibration = calibration_images(calib_data, model_metadata(model, size), num_calib)  # bad data: no file written
    export_model(model, fp32, "onnx", img_size=size, dynamic_batch=True)
    return fp32, quantize_onnx(fp32, out, calibration, settings)


# Each row changes one or two things of PLAIN (min-max ranges, per-channel weights, every layer INT8).
# reduce_range: onnxruntime's x86 uint8 x int8 kernels can saturate int16 intermediate sums; 7-bit
# weights avoid that (onnxruntime's quantization docs).
PLAIN = QuantSettings("minmax", per_channel=True, keep_float="none", reduce_range=False)
DEFAULT_STUDY = (
    replace(PLAIN, per_channel=False),
    PLAIN,
    replace(PLAIN, method="entropy"),
    replace(PLAIN, method="percentile"),
    replace(PLAIN, method="minmax-avg"),
    replace(PLAIN, reduce_range=True),
    replace(PLAIN, keep_float="first+last"),
    replace(PLAIN, keep_float="depthwise"),
    replace(PLAIN, keep_float="first3"),
    replace(PLAIN, keep_float="first3", method="minmax-avg"),
    replace(PLAIN, keep_float="first3", method="percentile"),
    replace(PLAIN, keep_float="first3", reduce_range=True),
)


def quantization_study(
    fp32_path: str | os.PathLike,
    calib_data: str | os.PathLike,
    eval_data: Any,
    settings: Iterable[QuantSettings] = DEFAULT_STUDY,
    num_calib: int = 300,
    out_dir: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Top-1 of the fp32 ONNX model and of its INT8 versions under each of ``settings``.

    Besides the top-1 drop, ``agreement`` (share of images whose INT8 top-1 class is the fp32
    one) and the relative logit error measure the damage on small evaluation sets, where a
    one-image change in accuracy is already a sizeable fraction of a point.
    """
    fp32_path = Path(fp32_path)
    out_dir = Path(out_dir or tempfile.mkdtemp(prefix="mobileone_study_"))
    calibration = calibration_images(calib_data, read_onnx_metadata(fp32_path), num_calib)
    ref, labels = onnx_logits(fp32_path, eval_data)
    top1, top5 = accuracy(ref, labels)
    rows = [
        {
            "settings": "fp32",
            "top1": top1,
            "top5": top5,
            "drop": 0.0,
            "agreement": 100.0,
            "logit_error": 0.0,
            "size_kb": fp32_path.stat().st_size / 1024,
            "images": len(labels),
        }
    ]
    for i, s in enumerate(settings):
        q = quantize_onnx(fp32_path, out_dir / f"int8_{i}.onnx", calibration, s)
        logits, _ = onnx_logits(q, eval_data)
        q1, q5 = accuracy(logits, labels)
        rows.append(
            {
                "settings": s.label(),
                "top1": q1,
                "top5": q5,
                "drop": top1 - q1,
                "agreement": 100.0 * (logits.argmax(1) == ref.argmax(1)).float().mean().item(),
                "logit_error": ((logits - ref).norm() / ref.norm()).item(),
                "size_kb": q.stat().st_size / 1024,
                "images": len(labels),
                "path": str(q),
            }
        )
    return rows


def study_table(rows: list[dict[str, Any]]) -> str:
    """The study as a markdown table."""
    lines = [
        "| quantization | top-1 % | top-5 % | top-1 drop (points) | agrees with fp32 % | logit error | file KB |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['settings']} | {r['top1']:.2f} | {r['top5']:.2f} | {r['drop']:.2f} | {r['agreement']:.1f} | "
        f"{r['logit_error']:.3f} | {r['size_kb']:.0f} |"
        for r in rows
    ]
    return "\n".join(lines)
