"""Export the fused (deployed) graph to ONNX, TorchScript, ExecuTorch or Core ML, and check it.

The most common deployment mistake is shipping the train-time graph, whose k branches cost up to
4x the deployed MACs (spec section 4), or fusing in train mode. ``export_model`` therefore always
fuses (in eval mode) before exporting and says so, writes the classes and the preprocessing into
the file where the format has a place for them, and then runs the exported file with its own
runtime on real images, failing when its outputs differ from the PyTorch model's.
"""

from __future__ import annotations

import copy
import importlib
import json
import logging
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .model import IMAGENET_MEAN, IMAGENET_STD, MobileOne, MobileOneLayer, reparameterize_model

log = logging.getLogger("mobileone")

FORMATS = {"onnx": ".onnx", "torchscript": ".pt", "executorch": ".pte", "coreml": ".mlpackage"}
INPUT_NAME, OUTPUT_NAME = "input", "logits"
METADATA_FILE = "mobileone.json"  # the TorchScript extra file holding the metadata


class ExportError(RuntimeError):
    """The export failed, or the exported model does not reproduce the PyTorch model."""


def require(module: str, extra: str = "export") -> Any:
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{module.split('.')[0]} is needed for this and is not installed: pip install 'mobileone[{extra}]'"
        ) from e


@dataclass
class ExportReport:
    """What was exported, whether it had to be fused, and how well the exported file matches PyTorch."""

    path: Path
    format: str
    fused_on_export: bool
    check: str
    max_abs_diff: float | None = None
    tolerance: float | None = None
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"exported {self.format} to {self.path}"]
        if self.fused_on_export:
            lines.append("the model had train-time branches: fused it (eval mode) before exporting")
        if self.max_abs_diff is not None:
            lines.append(
                f"check ({self.check}): max |exported - PyTorch| = {self.max_abs_diff:.3g} "
                f"(tolerance {self.tolerance:.3g})"
            )
        else:
            lines.append(f"check: {self.check}")
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def model_metadata(model: nn.Module, img_size: int) -> dict[str, Any]:
    """Classes and preprocessing a deployed app needs, read off a MobileOne (or defaults)."""
    pre = dict(getattr(model, "preprocess", {}) or {})
    meta = {
        "architecture": "MobileOne" if isinstance(model, MobileOne) else type(model).__name__,
        "variant": getattr(model, "variant", None),
        "fused": True,
        "class_names": getattr(model, "class_names", None),
        "mean": list(pre.get("mean", (0.485, 0.456, 0.406))),
        "std": list(pre.get("std", (0.229, 0.224, 0.225))),
        "input_size": [3, img_size, img_size],
        "crop_pct": pre.get("crop_pct", 0.875),
        "input_layout": "NCHW, RGB, float32, (x / 255 - mean) / std",
    }
    return meta


def fuse_for_export(model: nn.Module) -> tuple[nn.Module, bool, list[str]]:
    """An eval-mode copy of ``model`` with every MobileOne layer fused; whether fusing was needed."""
    model = copy.deepcopy(model).eval()
    unfused = any(isinstance(m, MobileOneLayer) and not m.inference_mode for m in model.modules())
    notes = []
    if unfused:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model = reparameterize_model(model, inplace=True)
        notes = [str(w.message) for w in caught if "train mode" not in str(w.message)]
    return model, unfused, notes


def sample_images(n: int = 8, img_size: int = 224, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> Tensor:
    """Real photographs (matplotlib's sample images), cropped at several places and normalized.

    Export checks run on these rather than on noise: real images exercise the value ranges a
    deployed model sees. Without matplotlib the check falls back to Gaussian noise.
    """
    from PIL import Image

    try:
        from matplotlib.cbook import get_sample_data

        photos = [Image.open(get_sample_data(name)).convert("RGB") for name in ("grace_hopper.jpg", "logo2.png")]
    except (ImportError, OSError):
        return torch.randn(n, 3, img_size, img_size, generator=torch.Generator().manual_seed(0))
    out = []
    for i in range(n):
        img = photos[i % len(photos)]
        w, h = img.size
        side = int(min(w, h) * (1.0 - 0.15 * (i // len(photos) % 4)))
        x0, y0 = (w - side) * (i % 3) // 2, (h - side) * (i % 5) // 4
        crop = img.crop((x0, y0, x0 + side, y0 + side)).resize((img_size, img_size), Image.BILINEAR)
        out.append(torch.from_numpy(np.asarray(crop, dtype=np.float32) / 255.0).permute(2, 0, 1))
    x = torch.stack(out)
    return (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)


def export_model(
    model: nn.Module,
    out: str | Path,
    format: str | None = None,
    img_size: int | None = None,
    dynamic_batch: bool = False,
    check: bool = True,
    check_inputs: Tensor | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> ExportReport:
    """Fuse, export and verify ``model``; raises :class:`ExportError` when the check fails.

    ``format`` defaults to the one the suffix of ``out`` names. The check runs the exported file
    with its runtime (onnxruntime, TorchScript, the ExecuTorch runtime; Core ML only on macOS,
    elsewhere a structural check) on ``check_inputs`` (default: real photographs) and compares with
    the eval-mode PyTorch model; the tolerance is ``atol + rtol * max |PyTorch output|``
    (defaults per format in ``DEFAULT_TOLERANCE``).
    """
    out = Path(out)
    format = format or next((f for f, s in FORMATS.items() if out.suffix == s), None)
    if format not in FORMATS:
        raise ValueError(f"unknown export format {format!r} for {out}; choose one of {list(FORMATS)}")
    if out.suffix != FORMATS[format]:
        out = out.with_suffix(FORMATS[format])
    img_size = img_size or int((getattr(model, "preprocess", None) or {}).get("input_size", 224))
    reference = copy.deepcopy(model).eval()
    fused, fused_now, notes = fuse_for_export(model)
    meta = model_metadata(model, img_size)
    in_chans = getattr(model, "in_chans", 3)
    # torch.export specializes a batch of 1 to a constant, so a dynamic batch is traced with 2.
    example = torch.zeros(2 if dynamic_batch else 1, in_chans, img_size, img_size)
    out.parent.mkdir(parents=True, exist_ok=True)
    log.info("exporting %s (fused=%s) to %s", format, True, out)
    with torch.inference_mode(False), torch.no_grad():
        _EXPORTERS[format](fused, out, example, meta, dynamic_batch)
    report = ExportReport(out, format, fused_now, check="not run", notes=notes)
    if not check:
        return report
    if check_inputs is None:
        check_inputs = sample_images(8, img_size, meta["mean"], meta["std"])
    with torch.no_grad():
        expected = reference(check_inputs).float()
    got, how = _VERIFIERS[format](out, check_inputs, dynamic_batch, fused)
    report.check = how
    if got is None:
        return report
    report.max_abs_diff = float((got.float() - expected).abs().max())
    default_atol, default_rtol = DEFAULT_TOLERANCE[format]
    atol = default_atol if atol is None else atol
    rtol = default_rtol if rtol is None else rtol
    report.tolerance = atol + rtol * float(expected.abs().max())
    if not report.max_abs_diff <= report.tolerance:
        raise ExportError(
            f"{format} export at {out} differs from the PyTorch model by {report.max_abs_diff:.3g} "
            f"(tolerance {report.tolerance:.3g}) on {len(check_inputs)} images; "
            "the file is kept for inspection but should not be deployed"
        )
    return report


def _run_batches(run, x: Tensor, dynamic_batch: bool) -> Tensor:
    """Run all of ``x`` at once if the export takes any batch size, else image by image."""
    if dynamic_batch:
        return run(x)
    return torch.cat([run(x[i : i + 1]) for i in range(len(x))])


# ---------------------------------------------------------------------------- ONNX


def to_onnx(model: nn.Module, out: Path, example: Tensor, dynamic_batch: bool = False) -> None:
    """Export ``model`` as it is (no fusing, no check) with torch's dynamo ONNX exporter."""
    require("onnx")
    require("onnxscript")
    dynamic = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            model,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamo=True,
            dynamic_shapes=dynamic,
            verbose=False,
        )
    program.save(str(out))


def _export_onnx(model: nn.Module, out: Path, example: Tensor, meta: dict, dynamic_batch: bool) -> None:
    onnx = require("onnx")
    to_onnx(model, out, example, dynamic_batch)
    proto = onnx.load(str(out))
    set_onnx_metadata(proto, meta)
    onnx.save(proto, str(out))


def set_onnx_metadata(proto: Any, meta: dict[str, Any]) -> None:
    """Write ``meta`` into the ONNX ``metadata_props`` (values as JSON) and a readable doc string."""
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in meta.items():
        text = value if isinstance(value, str) else json.dumps(value)
        if key in existing:
            existing[key].value = text
        else:
            proto.metadata_props.add(key=key, value=text)
    proto.doc_string = (
        f"{meta.get('variant') or meta.get('architecture')} (fused); preprocessing: {meta.get('input_layout')}"
    )


def read_onnx_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata ``export_model`` wrote into an ONNX file (JSON values decoded)."""
    onnx = require("onnx")
    proto = onnx.load(str(path), load_external_data=False)
    out = {}
    for p in proto.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except json.JSONDecodeError:
            out[p.key] = p.value
    return out


def onnx_session(path: str | Path, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with full graph optimization and a fixed thread count."""
    ort = require("onnxruntime")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def _verify_onnx(path: Path, x: Tensor, dynamic_batch: bool, fused: nn.Module) -> tuple[Tensor, str]:
    onnx = require("onnx")
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    if "BatchNormalization" in ops:
        raise ExportError(f"{path} still contains BatchNormalization nodes: the graph was not fused")
    session = onnx_session(path)
    name = session.get_inputs()[0].name

    def run(batch: Tensor) -> Tensor:
        return torch.from_numpy(session.run(None, {name: batch.numpy()})[0])

    return _run_batches(run, x, dynamic_batch), f"onnxruntime {_version('onnxruntime')}, {len(x)} real images"


# ---------------------------------------------------------------------------- TorchScript


def _export_torchscript(model: nn.Module, out: Path, example: Tensor, meta: dict, dynamic_batch: bool) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
    torch.jit.save(traced, str(out), _extra_files={METADATA_FILE: json.dumps(meta)})


def read_torchscript_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata stored as an extra file beside a TorchScript export."""
    extra = {METADATA_FILE: ""}
    torch.jit.load(str(path), _extra_files=extra)
    return json.loads(extra[METADATA_FILE])


def _verify_torchscript(path: Path, x: Tensor, dynamic_batch: bool, fused: nn.Module) -> tuple[Tensor, str]:
    loaded = torch.jit.load(str(path)).eval()
    with torch.no_grad():
        return _run_batches(loaded, x, True), f"TorchScript (torch {torch.__version__}), {len(x)} real images"


# ---------------------------------------------------------------------------- ExecuTorch


def to_executorch(
    model: nn.Module, out: Path, example: Tensor, dynamic_batch: bool = False, constants: dict[str, Any] | None = None
) -> None:
    """Lower ``model`` as it is to an ExecuTorch program for the XNNPACK CPU backend."""
    exir = require("executorch.exir")
    xnnpack = require("executorch.backends.xnnpack.partition.xnnpack_partitioner")
    dynamic = ({0: torch.export.Dim("batch", min=1, max=256)},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.export.export(model, (example,), dynamic_shapes=dynamic)
        edge = exir.to_edge_transform_and_lower(
            program, partitioner=[xnnpack.XnnpackPartitioner()], constant_methods=constants or None
        )
        out.write_bytes(edge.to_executorch().buffer)


def _export_executorch(model: nn.Module, out: Path, example: Tensor, meta: dict, dynamic_batch: bool) -> None:
    # Constant methods are ExecuTorch's place for metadata: the JSON, and the numbers apps need most.
    constants = {
        "mobileone_metadata": json.dumps(meta),
        "mean": meta["mean"],
        "std": meta["std"],
        "input_size": meta["input_size"],
    }
    to_executorch(model, out, example, dynamic_batch, constants)


def executorch_program(path: str | Path) -> Any:
    """Load a ``.pte`` with the ExecuTorch runtime."""
    runtime = require("executorch.runtime")
    return runtime.Runtime.get().load_program(str(path))


def read_executorch_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata stored as a constant method (``mobileone_metadata``) of an ExecuTorch program."""
    program = executorch_program(Path(path))
    return json.loads(program.load_method("mobileone_metadata").execute([])[0])


def _verify_executorch(path: Path, x: Tensor, dynamic_batch: bool, fused: nn.Module) -> tuple[Tensor, str]:
    method = executorch_program(path).load_method("forward")
    got = _run_batches(lambda b: method.execute([b.contiguous()])[0], x, dynamic_batch)
    return got, f"ExecuTorch runtime {_version('executorch')} (XNNPACK), {len(x)} real images"


# ---------------------------------------------------------------------------- Core ML


def _export_coreml(model: nn.Module, out: Path, example: Tensor, meta: dict, dynamic_batch: bool) -> None:
    ct = require("coremltools")
    shape = list(example.shape)
    if dynamic_batch:
        shape[0] = ct.RangeDim(lower_bound=1, upper_bound=256, default=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(model, example)
        classes = meta.get("class_names")
        mlmodel = ct.convert(
            traced,
            inputs=[ct.TensorType(name=INPUT_NAME, shape=ct.Shape(shape))],
            outputs=None if classes else [ct.TensorType(name=OUTPUT_NAME)],
            classifier_config=ct.ClassifierConfig([str(c) for c in classes]) if classes else None,
            convert_to="mlprogram",
        )
    mlmodel.short_description = f"{meta.get('variant') or meta.get('architecture')} (fused MobileOne graph)"
    mlmodel.input_description[INPUT_NAME] = f"{meta['input_layout']}; mean {meta['mean']}, std {meta['std']}"
    for key, value in meta.items():
        mlmodel.user_defined_metadata[key] = value if isinstance(value, str) else json.dumps(value)
    if out.exists():
        import shutil

        shutil.rmtree(out)
    mlmodel.save(str(out))


def read_coreml_metadata(path: str | Path) -> dict[str, Any]:
    """The user-defined metadata of a ``.mlpackage`` (readable on any OS)."""
    ct = require("coremltools")
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    out = {}
    for key, value in spec.description.metadata.userDefined.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def coreml_op_counts(path: str | Path) -> dict[str, int]:
    """How many of each MIL op the Core ML program holds (a structural check that works on Linux)."""
    ct = require("coremltools")
    spec = ct.models.MLModel(str(path), skip_model_load=True).get_spec()
    main = spec.mlProgram.functions["main"]
    counts: dict[str, int] = {}
    for op in main.block_specializations[main.opset].operations:
        counts[op.type] = counts.get(op.type, 0) + 1
    return counts


def _verify_coreml(path: Path, x: Tensor, dynamic_batch: bool, fused: nn.Module) -> tuple[Tensor | None, str]:
    ct = require("coremltools")
    ops = coreml_op_counts(path)
    convs = sum(isinstance(m, nn.Conv2d) for m in fused.modules())
    if ops.get("batch_norm", 0) or ops.get("conv", 0) != convs:
        raise ExportError(
            f"{path} holds {ops.get('conv', 0)} convs and {ops.get('batch_norm', 0)} batch norms; "
            f"the fused model has {convs} convs and none"
        )
    if "mean" not in read_coreml_metadata(path):
        raise ExportError(f"{path} lacks the preprocessing metadata (mean, std, input size)")
    if sys.platform != "darwin":
        return None, (
            f"structural only ({ops['conv']} convs, no batch norm, metadata present): Core ML prediction needs macOS"
        )
    mlmodel = ct.models.MLModel(str(path))
    spec = mlmodel.get_spec()
    classes = read_coreml_metadata(path).get("class_names")

    def run(batch: Tensor) -> Tensor:
        result = mlmodel.predict({INPUT_NAME: batch.numpy()})
        if classes:
            probs = result[spec.description.predictedProbabilitiesName]
            return torch.tensor([[probs[str(c)] for c in classes]])
        return torch.from_numpy(np.asarray(result[OUTPUT_NAME]))

    got = _run_batches(run, x, False)
    return got, f"Core ML {_version('coremltools')} prediction (float16 compute), {len(x)} real images"


_EXPORTERS = {
    "onnx": _export_onnx,
    "torchscript": _export_torchscript,
    "executorch": _export_executorch,
    "coreml": _export_coreml,
}
_VERIFIERS = {
    "onnx": _verify_onnx,
    "torchscript": _verify_torchscript,
    "executorch": _verify_executorch,
    "coreml": _verify_coreml,
}
# Core ML computes in float16 by default: compare with a looser tolerance than the fp32 runtimes.
DEFAULT_TOLERANCE = {
    "onnx": (1e-4, 1e-4),
    "torchscript": (1e-4, 1e-4),
    "executorch": (1e-4, 1e-4),
    "coreml": (5e-2, 2e-2),
}


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of any exported file, by its suffix."""
    path = Path(path)
    readers = {
        ".onnx": read_onnx_metadata,
        ".pt": read_torchscript_metadata,
        ".pte": read_executorch_metadata,
        ".mlpackage": read_coreml_metadata,
    }
    if path.suffix not in readers:
        raise ValueError(f"cannot read metadata from {path}: expected one of {list(readers)}")
    return readers[path.suffix](path)


def _version(module: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(module)
    except PackageNotFoundError:
        return "?"


def export_to_temp_onnx(model: nn.Module, img_size: int, dynamic_batch: bool = True) -> Path:
    """Export a fused ONNX copy of ``model`` into a temporary directory (for quantization, benchmarks)."""
    path = Path(tempfile.mkdtemp(prefix="mobileone_")) / "model.onnx"
    export_model(model, path, "onnx", img_size=img_size, dynamic_batch=dynamic_batch, check=False)
    return path
