"""The fast train-mode path against the per-branch reference (docs/fast-train.md, "What stays identical").

Every comparison runs the same module twice from the same state, once through the fast path and
once under ``reference_mode()``, and compares outputs, input and parameter gradients, and every
buffer (running mean/var, num_batches_tracked) after several steps.

The property tests replay the same examples on every run (``derandomize=True``); the random
exploration with more examples is ``test_random_layers_explore`` (``-m slow``), which prints the
seed and a ``@reproduce_failure`` blob when it finds a failure.
"""

import copy
import itertools
import os
import subprocess
import sys
import threading
from pathlib import Path
from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mobileone
from mobileone import create_model, reference_mode, set_fast_train
from mobileone.core import branch_stats, fast_train
from mobileone.core.model import MobileOneLayer

from .conftest import TINY

TOL = {torch.float64: 1e-5, torch.float32: 1e-4}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    scale = b.double().abs().max().item()
    return (a.double() - b.double()).abs().max().item() / (scale if scale > 0 else 1.0)


def run_steps(module, inputs, fast: bool, method: str | None = None, lr: float = 0.0) -> dict[str, torch.Tensor]:
    """Forward + backward (+ SGD when lr > 0) per input; every output, gradient and buffer by name."""
    results = {}
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9) if lr else None
    for i, x in enumerate(inputs):
        x = x.clone().requires_grad_()
        module.zero_grad(set_to_none=True)
        if fast and method is not None:
            y = module.activation(module.se(fast_train.branch_sum(module, x, method)))
        elif fast:
            y = module(x)
        else:
            with reference_mode():
                y = module(x)
        weights = torch.randn(y.shape, generator=torch.Generator().manual_seed(i))
        (y * weights.to(y.dtype)).sum().backward()
        results |= {f"output {i}": y.detach(), f"input grad {i}": x.grad}
        results |= {f"grad {n} {i}": p.grad for n, p in module.named_parameters() if p.grad is not None}
        if opt:
            opt.step()
    results |= {f"param {n}": p.detach() for n, p in module.named_parameters()}
    results |= {f"buffer {n}": b for n, b in module.named_buffers()}
    return results


def assert_same(fast_mod, ref_mod, inputs, dtype, method=None, lr=0.0):
    """Fast path equals reference within TOL[dtype].

    float32 needs two allowances, both checked against a float64 run of the reference: where the
    float32 reference itself is that far off, the fast path must be about as close as it is; and
    parameter gradients are measured against the step's largest parameter gradient, because a
    weight the next BatchNorm makes scale-invariant (a 1x1 depthwise kernel, one scalar per
    channel) has a gradient that is nothing but eps effects and cancellation.
    """
    anchor = copy.deepcopy(ref_mod).double() if dtype == torch.float32 else None
    fast = run_steps(fast_mod, inputs, True, method, lr)
    ref = run_steps(ref_mod, inputs, False, None, lr)
    assert fast.keys() == ref.keys()
    exact = run_steps(anchor, [x.double() for x in inputs], False, None, lr) if anchor is not None else None
    for key, value in fast.items():
        if "num_batches_tracked" in key:
            assert int(value) == int(ref[key]), key
            continue
        err = rel_err(value, ref[key])
        if err < TOL[dtype] or exact is None:
            assert err < TOL[dtype], key
        elif key.startswith("grad "):
            step = key.rsplit(" ", 1)[1]
            scale = max(g.abs().max().item() for k, g in exact.items() if k.startswith("grad ") and k.endswith(step))
            assert (value.double() - exact[key]).abs().max().item() / scale < TOL[dtype], key
        else:
            assert rel_err(value, exact[key]) <= max(TOL[dtype], 4 * rel_err(ref[key], exact[key])), key


def count_reference_calls():
    """Patch ``forward_branches`` (still running it) to count how often the reference path runs."""
    original = MobileOneLayer.forward_branches
    return mock.patch.object(MobileOneLayer, "forward_branches", autospec=True, side_effect=original)


def twins(module, dtype):
    """The module in train mode and a copy, with random BatchNorm scales and shifts.

    PyTorch's gamma = 1, beta = 0 would hide affine mistakes, and lets a 1x1 branch with a negative
    weight cancel the skip branch exactly, leaving the ReLU to decide on rounding noise.
    """
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d) and m.affine:
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.3, generator=gen)
    module = module.to(dtype).train()
    return module, copy.deepcopy(module)


@pytest.mark.parametrize("name", mobileone.list_models("classify"))
def test_variants_match_reference(name):
    # Each variant's structure (blocks, k, SE, branches) at an eighth of its widths, so float64
    # stays quick; three steps without weight updates (2 x 32 px leaves the last BatchNorms 2
    # values per channel, a net ill-conditioned enough to turn rounding into drift once weights move).
    config = mobileone.VARIANTS[name]
    narrow = config.replace(widths=tuple(max(8, w // 8) for w in config.widths), stem_width=config.stem_width // 4)
    torch.manual_seed(0)
    fast, ref = twins(create_model(narrow, num_classes=10), torch.float64)
    inputs = [torch.randn(2, 3, 32, 32, dtype=torch.float64) * 2 + 0.5 for _ in range(3)]
    assert_same(fast, ref, inputs, torch.float64)


def test_full_size_s0_matches_reference():
    torch.manual_seed(1)
    fast, ref = twins(create_model("s0", num_classes=10), torch.float64)
    assert_same(fast, ref, [torch.randn(2, 3, 32, 32, dtype=torch.float64)], torch.float64)


def test_trained_few_steps_same_weights():
    torch.manual_seed(2)
    config = TINY.replace(k=(4, 4, 2, 1), stem_k=2)
    fast, ref = twins(create_model(config, num_classes=5), torch.float64)
    inputs = [torch.randn(8, 3, 32, 32, dtype=torch.float64) for _ in range(4)]
    assert_same(fast, ref, inputs, torch.float64, lr=0.05)


def test_float32_several_steps_match_reference():
    # Without weight updates: SGD steps turn float32 rounding into chaotic drift (about 10x per
    # step here) for any two implementations, so float32 is compared step by step on fixed weights.
    torch.manual_seed(3)
    config = TINY.replace(k=(4, 4, 2, 1), stem_k=2)
    fast, ref = twins(create_model(config, num_classes=5), torch.float32)
    inputs = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    assert_same(fast, ref, inputs, torch.float32)


@st.composite
def layer_configs(draw):
    groups_kind = draw(st.sampled_from(["dense", "depthwise", "grouped"]))
    cin = draw(st.sampled_from([2, 4, 6]))
    if groups_kind == "depthwise":
        cout, groups = cin, cin
    else:
        groups = 1 if groups_kind == "dense" else 2
        cout = draw(st.sampled_from([2, 4, 8]))
    stride = draw(st.sampled_from([1, 2]))
    cfg = {
        "in_channels": cin,
        "out_channels": cout,
        "kernel_size": draw(st.sampled_from([1, 3, 5])),
        "stride": stride,
        "dilation": draw(st.sampled_from([1, 2])),
        "groups": groups,
        "k": draw(st.integers(1, 4)),
        "use_se": draw(st.booleans()),
        "scale_branch": draw(st.booleans()),
        "skip": draw(st.booleans()) and cin == cout and stride == 1,
    }
    size = draw(st.integers(3, 8))
    return cfg, (draw(st.integers(1, 3)), cin, size, size)


LAYER_EXAMPLES = (
    layer_configs(),
    st.sampled_from(["fold", "concat", "direct"]),
    st.sampled_from([torch.float64, torch.float32]),
    st.sampled_from([torch.contiguous_format, torch.channels_last]),
)


def check_random_layer(cfg_shape, method, dtype, memory_format):
    cfg, shape = cfg_shape
    torch.manual_seed(0)
    fast, ref = twins(MobileOneLayer(**cfg), dtype)
    inputs = [(torch.randn(shape, dtype=dtype) * 1.5 + 0.3).contiguous(memory_format=memory_format) for _ in range(3)]
    if shape[0] * ((shape[2] - 1) // cfg["stride"] + 1) ** 2 == 1:  # one value per channel: BN refuses
        with pytest.raises(ValueError, match="more than 1 value"):
            run_steps(fast, inputs, True, method)
        with pytest.raises(ValueError, match="more than 1 value"):
            run_steps(ref, inputs, False)
        return
    assert_same(fast, ref, inputs, dtype, method)


@settings(max_examples=60, deadline=None, derandomize=True, print_blob=True)
@given(*LAYER_EXAMPLES)
def test_random_layers_match_reference(cfg_shape, method, dtype, memory_format):
    check_random_layer(cfg_shape, method, dtype, memory_format)


@pytest.mark.slow
def test_random_layers_explore(asked_for_slow):
    settings(max_examples=600, deadline=None, print_blob=True)(given(*LAYER_EXAMPLES)(check_random_layer))()


@pytest.mark.parametrize("method", ["fold", "concat", "direct"])
@pytest.mark.parametrize(
    "bn_setup",
    [
        {"momentum": None},  # cumulative average
        {"momentum": 0.3, "eps": 1e-3},
        {"track_running_stats": False},
    ],
)
def test_batchnorm_options(bn_setup, method):
    torch.manual_seed(3)
    layer = MobileOneLayer(6, 6, 3, groups=6, k=3)
    for m in layer.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            for key, value in bn_setup.items():
                setattr(m, key, value)
            if not m.track_running_stats:
                m.running_mean = m.running_var = m.num_batches_tracked = None
    fast, ref = twins(layer, torch.float64)
    inputs = [torch.randn(2, 6, 5, 5, dtype=torch.float64) for _ in range(3)]
    assert_same(fast, ref, inputs, torch.float64, method)


def test_mixed_bn_settings_fall_back_to_reference():
    layer = MobileOneLayer(4, 4, 1, k=3).double().train()
    layer.rbr_conv[1].bn.momentum = 0.5  # branches disagree: no shared batch-norm call reproduces them
    with mock.patch.object(
        MobileOneLayer, "forward_branches", autospec=True, side_effect=MobileOneLayer.forward_branches
    ) as ref:
        layer(torch.randn(2, 4, 3, 3, dtype=torch.float64))
    assert ref.call_count == 1
    fast, twin = twins(layer, torch.float64)
    assert_same(fast, twin, [torch.randn(2, 4, 3, 3, dtype=torch.float64) for _ in range(2)], torch.float64)


def test_branch_bn_in_eval_mode_and_frozen_stages():
    torch.manual_seed(4)
    model = create_model(TINY, num_classes=5).double()
    model.freeze_stages(2)
    model.train()
    model.stage3[1].rbr_conv[0].bn.eval()  # norm_eval-style: one branch BN frozen in a trained stage
    fast, ref = copy.deepcopy(model), copy.deepcopy(model)
    inputs = [torch.randn(2, 3, 32, 32, dtype=torch.float64) for _ in range(2)]
    assert_same(fast, ref, inputs, torch.float64, lr=0.1)
    assert int(fast.stage1[0].rbr_conv[0].bn.num_batches_tracked) == 0  # frozen: statistics untouched


def test_dispatch_and_switches():
    model = create_model(TINY, num_classes=5).train()
    x = torch.randn(2, 3, 32, 32)
    n_layers = len(model.layers())
    with mock.patch.object(
        MobileOneLayer, "forward_branches", autospec=True, side_effect=MobileOneLayer.forward_branches
    ) as ref:
        model(x)
        assert ref.call_count == 0  # the fast path is the default in train mode
        with reference_mode():
            model(x)
        assert ref.call_count == n_layers
        assert fast_train.fast_train_enabled()  # the context manager restores the switch
        set_fast_train(model, False)
        model(x)
        assert ref.call_count == 2 * n_layers
        set_fast_train(model, True)
        model.eval()(x)  # eval mode keeps the per-branch path with running statistics
        assert ref.call_count == 3 * n_layers


def test_state_dict_keys_unchanged():
    model = create_model(TINY, num_classes=5)
    keys = list(model.state_dict())
    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert list(model.state_dict()) == keys
    assert list(create_model(TINY, num_classes=5).state_dict()) == keys


def test_eval_mode_after_fast_training_matches_fusion():
    torch.manual_seed(5)
    model = create_model(TINY, num_classes=5).double().train()
    for _ in range(3):
        model(torch.randn(4, 3, 32, 32, dtype=torch.float64))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    fused = mobileone.reparameterize_model(model.eval())
    assert rel_err(fused(x), model(x)) < 1e-10


def test_autocast_keeps_float32_statistics():
    torch.manual_seed(6)
    fast, ref = twins(MobileOneLayer(16, 16, 1, k=4), torch.float32)
    x = torch.randn(4, 16, 6, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fast = fast(x)
        with reference_mode():
            y_ref = ref(x)
    assert fast.rbr_conv[0].bn.running_var.dtype == torch.float32
    assert rel_err(y_fast.float(), y_ref.float()) < 5e-2  # bfloat16 convs: ~3 significant digits
    for bf, br in zip(fast.buffers(), ref.buffers()):
        assert rel_err(bf.float(), br.float()) < 2e-2


def test_autocast_whole_model_as_close_as_the_reference():
    """Under bfloat16 autocast (AMP's default on CUDA) every layer type runs, and the fast path is
    about as close to the float32 result as the per-branch reference is."""
    torch.manual_seed(7)
    exact, _ = twins(create_model(TINY, num_classes=5), torch.float32)
    fast, ref = copy.deepcopy(exact), copy.deepcopy(exact)
    x = torch.randn(4, 3, 32, 32)
    with reference_mode():
        y_exact = exact(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_fast = fast(x)
        with reference_mode():
            y_ref = ref(x)
    assert y_fast.dtype == torch.bfloat16
    for y in (y_exact, y_fast, y_ref):
        y.float().square().sum().backward()
    out_ref = rel_err(y_ref.float(), y_exact)
    assert rel_err(y_fast.float(), y_exact) < max(3 * out_ref, 2e-2)

    def grads(model):  # one vector: single small gradients are bfloat16 noise in both paths
        return torch.cat([p.grad.float().flatten() for p in model.parameters()])

    g_exact = grads(exact)
    err_fast, err_ref = ((grads(m) - g_exact).norm() / g_exact.norm() for m in (fast, ref))
    assert err_fast < max(3 * err_ref, 2e-2)
    for (name, b), b_exact in zip(fast.named_buffers(), exact.buffers()):
        assert b.dtype == b_exact.dtype, name  # running statistics stay float32


def test_bad_input_messages():
    layer = MobileOneLayer(4, 4, 3, groups=4, k=2).train()
    with pytest.raises(ValueError, match="unknown fast-train method"):
        fast_train.branch_sum(layer, torch.randn(2, 4, 5, 5), "magic")
    with pytest.raises(ValueError, match="no MobileOne layers"):
        set_fast_train(torch.nn.Linear(2, 2))
    layer.eval().reparameterize()
    with pytest.raises(ValueError, match="re-parameterized"):
        fast_train.branch_sum(layer, torch.randn(2, 4, 5, 5))


def test_plan_folds_where_it_saves_work():
    model = create_model("s0")
    dw, pw = model.stage3[2], model.stage3[3]  # depthwise 3x3 and pointwise 1x1 (k = 4, skip)
    x = torch.empty(32, 256, 14, 14, device="meta")
    assert fast_train.plan(dw, x) == "fold"
    assert fast_train.plan(pw, x) == "fold"  # k Cout Cin M = 4 * 256^2 * M > 2 M 256^2 + ...
    assert fast_train.plan(pw, torch.empty(1, 256, 2, 2, device="meta")) == "concat"  # M = 4 < Cin
    assert fast_train.plan(create_model("s1").stage3[3], x.new_empty(32, 512, 14, 14)) == "direct"  # k = 1
    assert fast_train.plan(model.stage3[0], torch.empty(32, 128, 28, 28, device="meta")) == "fold"  # dw, stride 2


def test_k1_layers_run_the_conv_once():
    """k = 1 (the detector's backbone): depthwise layers with scale + skip and pointwise layers run
    "direct" (one conv, no statistics-only pass) and match the reference; the dense stem with its
    dense 1x1 scale branch, and autocast, keep "fold"."""
    model = create_model("s0", k=1)
    dw, pw, x = model.stage3[2], model.stage3[3], torch.empty(32, 256, 14, 14)
    assert fast_train.plan(dw, x) == fast_train.plan(pw, x) == "direct"
    assert fast_train.plan(model.stage0, torch.empty(32, 3, 64, 64)) == "fold"
    with torch.autocast("cpu", torch.bfloat16):
        assert fast_train.plan(dw, x) == "direct"  # bf16 conv, float32 statistics
        assert fast_train.plan(dw, x.double()) == "fold"
    torch.manual_seed(11)
    for layer in (
        MobileOneLayer(6, 6, 3, groups=6),
        MobileOneLayer(6, 6, 3, stride=2, groups=6),
        MobileOneLayer(6, 6, 1),
    ):
        fast, ref = twins(layer, torch.float64)
        inputs = [torch.randn(3, 6, 9, 9, dtype=torch.float64) + 0.5 for _ in range(3)]
        with mock.patch.object(fast_train.F, "conv2d", wraps=fast_train.F.conv2d) as conv:
            run_steps(copy.deepcopy(fast), inputs, True)
        assert conv.call_count == len(inputs)  # one conv a step, none for statistics
        assert_same(fast, ref, inputs, torch.float64, lr=0.1)


def test_patch_covariance_where_it_pays():
    stem = create_model("s0").stage0  # 3x3, 3 -> 48: patches of 27 values, far fewer than k Cout
    assert fast_train._patch_covariance_pays(stem, 32 * 112 * 112)
    assert not fast_train._patch_covariance_pays(MobileOneLayer(64, 64, 3, k=4), 32 * 56 * 56)  # P = 576
    torch.manual_seed(8)
    fast, ref = twins(MobileOneLayer(3, 32, 3, stride=2, k=2), torch.float64)
    with mock.patch.object(fast_train, "F", wraps=fast_train.F) as functional:
        assert_same(fast, ref, [torch.randn(4, 3, 12, 12, dtype=torch.float64) for _ in range(3)], torch.float64)
    assert functional.unfold.call_count == 3


# ---- issue 14: PyTorch's CPU weight gradient of strided 1x1 convs (docs/fast-train.md, "A PyTorch bug") ----

ISSUE_14_LAYER = {
    "in_channels": 2,
    "out_channels": 4,
    "kernel_size": 3,
    "stride": 2,
    "dilation": 1,
    "groups": 1,
    "k": 3,
    "use_se": True,
    "scale_branch": True,
    "skip": False,
}
FORMATS = [torch.contiguous_format, torch.channels_last]
# The issue's input, and one whose weight gradient the broken kernel gets wrong more often with 2 threads.
STRESS_SHAPES = [(3, 2, 6, 6), (3, 2, 8, 8)]
STRESS_GRID = list(itertools.product(["concat", "fold"], [torch.float32, torch.float64], FORMATS, STRESS_SHAPES))


def stress(reps: int, phases: str) -> None:
    """Run the issue-14 layer over ``STRESS_GRID`` ``reps`` times per phase; raise on any mismatch.

    Meant for a subprocess (a heap corruption kills it). ``phases`` is a comma-separated list of
    ``<threads>`` or ``<threads>+busy`` (another thread running CPU-heavy torch ops meanwhile).
    Every run must match the reference, and repeated runs of one phase must agree bitwise.
    """
    for phase in phases.split(","):
        threads, busy = int(phase.split("+")[0]), phase.endswith("+busy")
        torch.set_num_threads(threads)
        stop = threading.Event()
        spinner = threading.Thread(target=_spin, args=(stop,))
        if busy:
            spinner.start()
        try:
            for method, dtype, fmt, shape in STRESS_GRID:
                first = None
                for rep in range(reps):
                    torch.manual_seed(0)
                    fast, ref = twins(MobileOneLayer(**ISSUE_14_LAYER), dtype)
                    inputs = [(torch.randn(shape, dtype=dtype) * 1.5 + 0.3).contiguous(memory_format=fmt)]
                    where = f"phase {phase}, {method}, {dtype}, {fmt}, {shape}, run {rep}"
                    try:
                        assert_same(copy.deepcopy(fast), ref, inputs, dtype, method)
                    except AssertionError as err:
                        raise AssertionError(f"{where}: differs from the reference in {err}") from None
                    got = run_steps(fast, inputs, True, method)
                    first = got if first is None else first
                    changed = [key for key in got if not torch.equal(got[key], first[key])]
                    assert not changed, f"{where}: not bitwise equal to run 0 in {changed}"
        finally:
            stop.set()
            if busy:
                spinner.join()


def _spin(stop: threading.Event) -> None:
    a = torch.randn(128, 128, generator=torch.Generator().manual_seed(0))  # not the global RNG the runs seed
    while not stop.is_set():
        a = torch.tanh(a @ a)


def run_stress(reps: int, phases: str) -> None:
    """:func:`stress` in a fresh process whose oneDNN is capped at AVX2, the ISA of the broken kernel.

    An AVX-512 CPU would otherwise never run that kernel; ``MALLOC_PERTURB_`` fills every new heap
    buffer with garbage, so a buffer the fast path left partly unwritten would show.
    """
    env = os.environ | {"ONEDNN_MAX_CPU_ISA": "AVX2", "MALLOC_PERTURB_": "165"}
    code = f"from tests.test_fast_train import stress; stress({reps}, {phases!r})"
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stderr[-3000:]}"


@pytest.fixture
def asked_for_slow(request):
    """Long explorations run only when selected by mark (``-m slow``), not in every ``make test``."""
    if "slow" not in request.config.getoption("markexpr", ""):
        pytest.skip("a long exploration: run it with -m slow")


def test_issue_14_layer_stress():
    run_stress(2, "1,2+busy")


@pytest.mark.slow
def test_issue_14_layer_stress_long(asked_for_slow):
    run_stress(15, "1,2,1+busy,2+busy")


@pytest.mark.parametrize("method", ["concat", "fold", "direct"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_deterministic(method, dtype, memory_format):
    """The same state and inputs twice: bitwise equal outputs, gradients and buffers."""
    torch.manual_seed(9)
    layer, _ = twins(MobileOneLayer(**ISSUE_14_LAYER), dtype)
    inputs = [(torch.randn(3, 2, 6, 6, dtype=dtype) * 1.5).contiguous(memory_format=memory_format) for _ in range(2)]
    first, second = (run_steps(copy.deepcopy(layer), inputs, True, method) for _ in range(2))
    assert [key for key in first if not torch.equal(first[key], second[key])] == []


def test_strided_pointwise_convs_run_at_unit_stride():
    weight = torch.randn(4, 2, 1, 1, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 2, 7, 7, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    assert branch_stats.hits_strided_1x1_bug(x, weight, 2, 0)
    assert not branch_stats.hits_strided_1x1_bug(x, weight, 1, 0)
    assert not branch_stats.hits_strided_1x1_bug(x, weight.detach(), 2, 0)  # no weight gradient: unaffected
    assert not branch_stats.hits_strided_1x1_bug(x, torch.randn(4, 2, 3, 3, requires_grad=True), 2, 1)
    with torch.no_grad():
        assert not branch_stats.hits_strided_1x1_bug(x, weight, 2, 0)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    ws = [weight.detach().clone().requires_grad_() for _ in range(2)]
    y_ref = torch.nn.functional.conv2d(xs[0], ws[0], None, 2)  # float64 does not reach oneDNN
    y = branch_stats.conv2d(xs[1], ws[1], None, 2)
    gy = torch.randn_like(y_ref)
    y_ref.backward(gy)
    y.backward(gy)
    assert rel_err(y, y_ref) < 1e-12
    assert rel_err(xs[1].grad, xs[0].grad) < 1e-12
    assert rel_err(ws[1].grad, ws[0].grad) < 1e-12


def test_reference_branches_avoid_the_strided_pointwise_conv():
    """The per-branch reference (the layer's scale branch, a ConvBN) goes around it too, but only
    where a weight gradient is taken, so inference and MAC counting still call the conv module."""
    layer = MobileOneLayer(**ISSUE_14_LAYER).train()
    x = torch.randn(3, 2, 6, 6).contiguous(memory_format=torch.channels_last)
    scale_kernel = layer.rbr_scale.conv.weight
    with mock.patch.object(fast_train.F, "conv2d", wraps=fast_train.F.conv2d) as conv, reference_mode():
        layer(x)
        assert [c.args[3] for c in conv.call_args_list if c.args[1] is scale_kernel] == [1]
        conv.reset_mock()
        with torch.no_grad():
            layer(x)
        assert [c.args[3] for c in conv.call_args_list if c.args[1] is scale_kernel] == [(2, 2)]  # nn.Conv2d's


def test_custom_functions_gradients_and_saved_tensors():
    """The fast path's autograd Functions: gradients right (gradcheck), and their saved tensors are
    guarded by autograd's version counter like any op's (an in-place change after forward raises)."""
    torch.manual_seed(10)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    kernels = torch.randn(2, 2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 4, 2, dtype=torch.float64, requires_grad=True)
    cov = torch.randn(2, 2, dtype=torch.float64)
    cov = (cov @ cov.T).requires_grad_()
    for fmt in (torch.contiguous_format, torch.channels_last):
        xi = x.contiguous(memory_format=fmt).requires_grad_()
        assert torch.autograd.gradcheck(branch_stats.Moments.apply, (xi,), fast_mode=True)
        for stride in (1, 2):
            conv = (stride, 1, 1, 2)
            assert torch.autograd.gradcheck(
                lambda a, k, c=conv: branch_stats.ConvMoments.apply(a, k, c), (xi, kernels), fast_mode=True
            )
            assert torch.autograd.gradcheck(
                lambda a, c=conv: branch_stats.ConvMoments.apply(a, None, c), (xi,), fast_mode=True
            )
    assert torch.autograd.gradcheck(branch_stats.QuadraticForms.apply, (w, cov), fast_mode=True)
    per_channel = [
        torch.randn(*n, dtype=torch.float64, requires_grad=True) for n in ((2,), (2,), (2, 2), (2, 2), (2, 2))
    ]
    for fmt, stride in itertools.product((torch.contiguous_format, torch.channels_last), (1, 2)):
        xi = x.contiguous(memory_format=fmt).requires_grad_()
        depthwise = torch.randn(2, 1, 3, 3, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(
            lambda a, k, *p, s=stride: branch_stats.ConvNormPlusAffine.apply(a, k, (s, 1, 1, 2), *p, 1e-3)[0],
            (xi, depthwise, *per_channel),
            fast_mode=True,
        )

    def changed_after_forward(fn, *inputs):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        used = [t * 1 for t in leaves]  # non-leaf copies that may be changed in place
        out = fn(*used)
        used[0].add_(1)
        sum(o.sum() for o in (out if isinstance(out, tuple) else (out,))).backward()

    for fn, inputs in [
        (branch_stats.Moments.apply, (x,)),
        (lambda a, k: branch_stats.ConvMoments.apply(a, k, (1, 1, 1, 2)), (x, kernels)),
        (branch_stats.QuadraticForms.apply, (w, cov)),
        (
            lambda a, k: branch_stats.ConvNormPlusAffine.apply(a, k, (1, 1, 1, 2), *per_channel, 1e-5)[0],
            (x, kernels[0]),
        ),
    ]:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            changed_after_forward(fn, *inputs)


@pytest.mark.parametrize(
    "layer",
    [
        lambda: MobileOneLayer(8, 8, 3, groups=8),
        lambda: MobileOneLayer(8, 8, 3, stride=2, groups=8),  # the phases input gradient
        lambda: MobileOneLayer(8, 8, 1),
    ],
)
def test_k1_layers_under_bf16_autocast_as_close_as_the_reference(layer):
    """The detector's bf16 autocast: "direct" runs the conv in bf16 with float32 statistics and is about as
    close to the float32 result (output, input and parameter gradients, running statistics) as the reference.
    Compared before the ReLU: a bf16 rounding that flips a near-zero output's sign moves a small layer's
    gradients by several percent, in either path."""
    torch.manual_seed(12)
    exact, _ = twins(layer(), torch.float32)
    fast, ref = copy.deepcopy(exact), copy.deepcopy(exact)
    x = torch.randn(4, 8, 10, 10) + 0.5
    dy = torch.randn_like(exact(x.clone()))
    exact.load_state_dict(fast.state_dict())  # undo that call's buffer update

    def run(model, autocast, reference):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = fast_train.branch_sum(model, xi, "reference" if reference else None)
        (y.float() * dy).sum().backward()
        grads = torch.cat([xi.grad.flatten()] + [p.grad.float().flatten() for p in model.parameters()])
        return y.float(), grads

    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast_train.plan(fast, x) == "direct"
    y_exact, g_exact = run(exact, False, True)
    y_fast, g_fast = run(fast, True, False)
    y_ref, g_ref = run(ref, True, True)
    assert rel_err(y_fast, y_exact) < max(3 * rel_err(y_ref, y_exact), 2e-2)
    err_fast, err_ref = ((g - g_exact).norm() / g_exact.norm() for g in (g_fast, g_ref))
    assert err_fast < max(3 * err_ref, 2e-2)
    for b_fast, b_exact in zip(fast.buffers(), exact.buffers()):
        assert b_fast.dtype == b_exact.dtype and rel_err(b_fast.float(), b_exact.float()) < 2e-2


@pytest.mark.parametrize("size", [(7, 7), (8, 6), (5, 10), (1, 1), (2, 3)])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_strided_depthwise_input_grad_is_the_conv_backward(size, memory_format):
    torch.manual_seed(14)
    x = torch.randn(2, 5, *size, dtype=torch.float64).contiguous(memory_format=memory_format)
    w = torch.randn(5, 1, 3, 3, dtype=torch.float64)
    dy = torch.randn_like(torch.nn.functional.conv2d(x, w, None, 2, 1, 1, 5))
    expected = torch.ops.aten.convolution_backward(
        dy, x, w, None, [2, 2], [1, 1], [1, 1], False, [0, 0], 5, [True, False, False]
    )[0]
    assert (branch_stats.strided_depthwise_input_grad(dy, w, x.shape[-2:]) - expected).abs().max() < 1e-12


def test_fast_strided_depthwise_module():
    """Depthwise 3x3 stride-2 ``nn.Conv2d`` layers (the detector's neck, MobileNetV3) become
    ``FastStridedDepthwise``: same state dict, plain conv in eval mode, and under bf16 autocast
    the phases input gradient, as close to float32 as autograd's own bf16 backward."""
    torch.manual_seed(15)
    nn = torch.nn
    model = nn.Sequential(
        nn.Conv2d(8, 8, 3, 2, 1, groups=8), nn.Conv2d(8, 8, 3, 1, 1, groups=8), nn.Conv2d(8, 16, 3, 2, 1)
    )
    fast = branch_stats.use_fast_strided_depthwise(copy.deepcopy(model))
    assert [type(m) for m in fast] == [branch_stats.FastStridedDepthwise, nn.Conv2d, nn.Conv2d]
    assert fast.state_dict().keys() == model.state_dict().keys()
    x = torch.randn(2, 8, 9, 9)

    def grads(m, autocast):
        m.zero_grad()
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(xi)
        y.float().square().sum().backward()
        return y.float(), torch.cat([xi.grad.flatten()] + [p.grad.flatten() for p in m.parameters()])

    y_exact, g_exact = grads(model, False)
    with mock.patch.object(
        branch_stats, "strided_depthwise_input_grad", wraps=branch_stats.strided_depthwise_input_grad
    ) as phases:
        y_fast, g_fast = grads(fast, True)
    assert phases.call_count == 1
    y_ref, g_ref = grads(model, True)
    assert rel_err(y_fast, y_exact) < max(3 * rel_err(y_ref, y_exact), 2e-2)
    assert (g_fast - g_exact).norm() / g_exact.norm() < max(3 * (g_ref - g_exact).norm() / g_exact.norm(), 2e-2)
    assert torch.equal(fast.eval()(x), model.eval()(x))
    with_bn = branch_stats.use_fast_strided_depthwise(
        nn.Sequential(nn.Conv2d(8, 8, 3, 2, 1, groups=8), nn.BatchNorm2d(8))
    )
    assert mobileone.core.fusion.fold_conv_bn(with_bn) == 1  # fuses like the nn.Conv2d it is
    assert type(with_bn[0]) is nn.Conv2d and isinstance(with_bn[1], nn.Identity)
