import pytest
import torch
from torch import nn

pytest.importorskip("onnxruntime", reason="INT8 needs onnxruntime: pip install 'mobileone[export]'")

import onnx  # noqa: E402

from mobileone import MobileOneConfig, create_model, save_checkpoint  # noqa: E402
from mobileone.cli import main  # noqa: E402
from mobileone.deploy.evaluate_onnx import evaluate_onnx, onnx_logits  # noqa: E402
from mobileone.deploy.export import export_model  # noqa: E402
from mobileone.deploy.onnx import read_onnx_metadata  # noqa: E402
from mobileone.deploy.quantize import QuantSettings  # noqa: E402
from mobileone.tasks.classify.data import builtin_dataset, digits_split, eval_transform  # noqa: E402

SIZE = 16


pytestmark = pytest.mark.usefixtures("one_thread")


def _train_on_digits() -> nn.Module:
    """A tiny MobileOne trained for a few seconds on the digits: accurate enough to lose accuracy."""
    from PIL import Image

    torch.manual_seed(0)
    xt, yt, _, _ = digits_split()
    tf = eval_transform(SIZE, 1.0)
    x = torch.stack([tf(Image.fromarray(im).convert("RGB")) for im in xt])
    y = torch.as_tensor(yt)
    cfg = MobileOneConfig(widths=(16, 24, 32, 64), stem_width=16, blocks=(1, 1, 1, 1), k=2)
    model = create_model(cfg, num_classes=10)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    model.train()
    for _ in range(8):
        for idx in torch.randperm(len(x)).split(64):
            loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.class_names = [str(i) for i in range(10)]
    model.preprocess.update(input_size=SIZE, crop_pct=1.0)
    return model.eval()


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """Digits on disk, a trained tiny model's checkpoint, and `mobileone quantize` run on it once."""
    tmp = tmp_path_factory.mktemp("quant")
    data = builtin_dataset(tmp / "digits")
    model = _train_on_digits()
    ckpt = save_checkpoint(model, tmp / "run" / "best.safetensors")
    out = tmp / "int8.onnx"
    argv = [
        "quantize",
        "--checkpoint",
        str(ckpt),
        "--calib-data",
        str(data),
        "--out",
        str(out),
        "--num-calib",
        "200",
        "--eval-data",
        str(data),
        "--max-drop",
        "2.5",
    ]
    return {"data": data, "model": model, "int8": out, "fp32": tmp / "int8.fp32.onnx", "argv": argv, "tmp": tmp}


def test_int8_accuracy_drop_is_bounded(quantized, capsys):
    assert main(quantized["argv"]) == 0
    assert "drop" in capsys.readouterr().out
    ref, labels = onnx_logits(quantized["fp32"], quantized["data"], threads=1)
    got, _ = onnx_logits(quantized["int8"], quantized["data"], threads=1)
    assert len(labels) == 360  # the held-out digits
    fp32, int8 = (100.0 * (x.argmax(1) == labels).float().mean().item() for x in (ref, got))
    print(f"digits, tiny MobileOne: fp32 top-1 {fp32:.2f}, INT8 {int8:.2f}")
    assert fp32 > 85, "the tiny model should have learned the digits"
    # Measured here: 1.1 points (4 of 360 images) with the default settings; 1 image = 0.28 points.
    assert fp32 - int8 <= 2.5
    assert (got.argmax(1) == ref.argmax(1)).float().mean() > 0.95


def test_int8_file_is_qdq_keeps_metadata_and_first_layers_float(quantized):
    if not quantized["int8"].exists():
        main(quantized["argv"])
    graph = onnx.load(str(quantized["int8"])).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") >= 5 and ops.count("DequantizeLinear") >= 10
    produced_by = {o: n.op_type for n in graph.node for o in n.output}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    weight_source = [produced_by.get(c.input[1]) for c in convs]
    assert weight_source[:3] == [None, None, None]  # first3: float weights straight from initializers
    assert all(s == "DequantizeLinear" for s in weight_source[3:])
    meta = read_onnx_metadata(quantized["int8"])
    assert meta["class_names"] == [str(i) for i in range(10)] and meta["input_size"] == [3, SIZE, SIZE]
    assert len(meta["quantization"]["keep_float"]) == 3 and meta["quantization"]["calibration_images"] == 200
    assert meta["quantization"]["runtime"] == "onnxruntime" and meta["quantization"]["per_channel"]
    assert quantized["int8"].stat().st_size < quantized["fp32"].stat().st_size


def test_evaluate_onnx_matches_classes_by_name(quantized):
    """A model whose head lists the classes in reverse order scores the same on the same folder."""
    model = quantized["model"]
    flipped = create_model(model.config, num_classes=10)
    flipped.load_state_dict(model.state_dict())
    with torch.no_grad():
        flipped.linear.weight.copy_(model.linear.weight.flip(0))
        flipped.linear.bias.copy_(model.linear.bias.flip(0))
    flipped.class_names = model.class_names[::-1]
    flipped.preprocess = dict(model.preprocess)
    path = export_model(flipped.eval(), quantized["tmp"] / "flipped.onnx", dynamic_batch=True).path
    if not quantized["fp32"].exists():
        main(quantized["argv"])
    original = evaluate_onnx(quantized["fp32"], quantized["data"], threads=1)["top1"]
    assert evaluate_onnx(path, quantized["data"], threads=1)["top1"] == pytest.approx(original)


def test_bad_settings_and_data_are_explained(tmp_path):
    with pytest.raises(ValueError, match="calibration method"):
        QuantSettings("kl")
    with pytest.raises(ValueError, match="keep_float"):
        QuantSettings(keep_float="middle")
    QuantSettings(keep_float="first5+last+depthwise")  # valid
    from mobileone.deploy.quantize import calibration_images

    with pytest.raises(FileNotFoundError, match="does not exist"):
        calibration_images(tmp_path / "nowhere", {"input_size": [3, 16, 16], "mean": [0] * 3, "std": [1] * 3})


def test_cli_eval_onnx(quantized, capsys):
    if not quantized["int8"].exists():
        main(quantized["argv"])
    capsys.readouterr()
    assert main(["eval", "--onnx", str(quantized["int8"]), "--data", str(quantized["data"])]) == 0
    out = capsys.readouterr().out
    assert "(onnxruntime)" in out and "360 images" in out
