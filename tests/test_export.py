import importlib.util
import sys

import pytest
import torch
from torch import nn

from mobileone import MobileOneLayer, save_checkpoint
from mobileone.cli import main
from mobileone.deploy.common import ExportError, require
from mobileone.deploy.export import export_model, read_metadata, sample_images

RUNTIME_OF = {
    "onnx": "onnxruntime",
    "torchscript": "torch",
    "executorch": "executorch",
    "coreml": "coremltools",
    "tflite": "ai_edge_litert",
    "openvino": "openvino",
    "ncnn": "ncnn",
}
CLASSES = ["cat", "dog", "emu", "fox", "gnu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _needs(module: str) -> None:
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module} is not installed (pip install 'mobileone[export]')")


@pytest.fixture
def trained(tiny_model):
    """The tiny model in train mode, with classes: what users export by mistake."""
    tiny_model.class_names = CLASSES
    tiny_model.preprocess.update(input_size=32)
    return tiny_model.train()


@pytest.mark.parametrize(
    "fmt",
    ["onnx", "torchscript", "executorch", "coreml", pytest.param("tflite", marks=pytest.mark.slow), "openvino", "ncnn"],
)
def test_round_trip_fuses_and_matches(trained, tmp_path, fmt):
    _needs(RUNTIME_OF[fmt])
    report = export_model(trained, tmp_path / "model", fmt)
    assert report.fused_on_export, "a train-mode, unfused model must be fused before export"
    assert report.path.exists() and report.path.suffix in (
        ".onnx",
        ".pt",
        ".pte",
        ".mlpackage",
        ".tflite",
        ".xml",
        ".param",
    )
    if fmt == "coreml" and sys.platform != "darwin":
        assert report.max_abs_diff is None and "structural" in report.check
    else:
        assert report.max_abs_diff is not None and report.max_abs_diff <= report.tolerance
        # float32 end to end: OpenVINO's fp16 weights / bf16 math or ncnn's fp16 storage would give ~1e-4
        assert report.relative_error < 1e-5 and report.top1_agreement == 100.0
    meta = read_metadata(report.path)
    assert meta["class_names"] == CLASSES
    assert meta["input_size"] == [3, 32, 32] and len(meta["mean"]) == 3 and meta["fused"] is True
    assert trained.training and any(not m.inference_mode for m in trained.modules() if isinstance(m, MobileOneLayer))


def test_onnx_graph_is_the_fused_one_and_takes_any_batch(trained, tmp_path):
    _needs("onnxruntime")
    import onnx

    from mobileone.deploy.onnx import onnx_session

    report = export_model(trained, tmp_path / "m.onnx", dynamic_batch=True)
    ops = [n.op_type for n in onnx.load(str(report.path)).graph.node]
    layers = sum(isinstance(m, MobileOneLayer) for m in trained.modules())
    se_convs = 2 * sum(
        isinstance(m.se, nn.Module) and not isinstance(m.se, nn.Identity)
        for m in trained.modules()
        if isinstance(m, MobileOneLayer)
    )
    assert "BatchNormalization" not in ops
    assert ops.count("Conv") == layers + se_convs  # one conv per layer: no branches left
    x = sample_images(3, 32)
    out = onnx_session(report.path).run(None, {"input": x.numpy()})[0]
    assert torch.allclose(torch.from_numpy(out), trained.eval()(x), atol=1e-4)


def test_sample_images_are_real_photographs_normalized():
    x = sample_images(4, 24)
    assert x.shape == (4, 3, 24, 24)
    assert x.std() > 0.3 and abs(x.mean()) < 2  # natural images after ImageNet normalization
    assert not torch.equal(x[0], x[2])  # different crops


class Noisy(nn.Module):
    """A model whose every run differs: its export can never match, so the check must fail."""

    def forward(self, x):
        return x.mean((2, 3)) + torch.rand(x.shape[0], 3)


def test_mismatch_fails_loudly(tmp_path):
    with pytest.raises(ExportError, match="differs from the PyTorch model"):
        export_model(Noisy(), tmp_path / "noisy.pt", img_size=16)


def test_bad_format_and_missing_extra(tiny_model, tmp_path):
    with pytest.raises(ValueError, match="unknown export format"):
        export_model(tiny_model, tmp_path / "m.xyz")
    with pytest.raises(ImportError, match=r"mobileone\[export\]"):
        require("surely_not_an_installed_module")


def test_cli_exports_an_unfused_checkpoint_fused(tiny_model, tmp_path, capsys):
    _needs("onnxruntime")
    tiny_model.preprocess.update(input_size=32)
    ckpt = save_checkpoint(tiny_model, tmp_path / "run" / "best.safetensors")
    assert main(["export", "--checkpoint", str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 0
    out = capsys.readouterr().out
    assert "fused it" in out and "max |exported - PyTorch|" in out
    assert (tmp_path / "m.onnx").exists()


def test_native_noise_is_filtered_and_real_messages_kept(capfd):
    import os

    from mobileone.deploy.common import filtered_native_stderr

    with filtered_native_stderr():
        os.write(2, b"[cpuinfo_utils.cpp:71] Reading file /sys/devices/soc0/image_version\n")
        os.write(2, b"a real error from a native library\n")
    err = capfd.readouterr().err
    assert "cpuinfo_utils" not in err and "a real error from a native library" in err
