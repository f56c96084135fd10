"""The command line: `mobileone info` and its errors."""

import json

from mobileone.cli import main


def test_info_table(capsys):
    assert main(["info", "s0", "mobileone_s4"]) == 0
    out = capsys.readouterr().out
    assert "| mobileone_s0 | 5,293,272 | 2,078,504 | 1,051.9 M | 275.1 M | 44 |" in out
    assert "| mobileone_s4 | 14,951,248 | 14,838,352 |" in out and "2,979.3 M" in out


def test_info_json(capsys):
    assert main(["info", "s1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert row["params_fused"] == 4_764_840 and round(row["macs_fused"] / 1e6, 1) == 825.1


def test_info_unknown_variant(capsys):
    assert main(["info", "s7"]) == 2
    assert "unknown MobileOne variant 's7'" in capsys.readouterr().err


def test_info_checkpoint(tmp_path, capsys):
    import torch

    from mobileone import create_model

    path = tmp_path / "mobileone_s1.pth.tar"
    torch.save(create_model("s1", num_classes=10, inference_mode=True).state_dict(), path)
    assert main(["info", "--checkpoint", str(path)]) == 0
    out = capsys.readouterr().out
    assert "apple layout, fused, 10 classes, variant mobileone_s1" in out
    head = 1280 * 990 + 990  # the documented sizes are for 1000 classes; this head has 10
    assert f"| mobileone_s1 | {4_825_192 - head:,} | {4_764_840 - head:,} |" in out


def test_demo_end_to_end(tmp_path, capsys):
    """The main job, shortened to one epoch: trains, evaluates, fuses, checks agreement, exports."""
    out = tmp_path / "demo"
    assert main(["demo", "--epochs", "1", "--img-size", "16", "--out", str(out)]) == 0
    report = capsys.readouterr().out
    assert "fused vs unfused: max |logit difference|" in report and "-> agree" in report
    assert "onnxruntime" in report and "unfused" in report
    for name in ("metrics.jsonl", "best.safetensors", "best_fused.safetensors", "model.onnx", "curves.png"):
        assert (out / name).is_file(), name


def test_info_and_help_need_torch_alone():
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys\n"
        "from mobileone.cli import main\n"
        "assert main(['info', 's0', '--json']) == 0 and main(['eval', '--help']) == 0\n"
        "print('HEAVY', [m for m in ('torchvision', 'onnx', 'onnxruntime', 'matplotlib', 'PIL') if m in sys.modules])\n"
    )
    env = {"PYTHONPATH": str(Path(__file__).resolve().parents[1]), "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "HEAVY []" in done.stdout, done.stdout[-500:] + done.stderr[-2000:]
