"""The package's shape: imports run one way (core < engine < tasks < deploy < bench < commands < cli),
no cycles, the core importable with torch alone, and fusion by protocol for composite models."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import mobileone
from mobileone import FusionWarning, MobileOneConfig, create_model, reparameterize_model

from .conftest import settle_bn

PACKAGE = Path(mobileone.__file__).parent
LAYERS = ["core", "engine", "tasks", "deploy", "bench", "commands", "cli"]  # bottom to top


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> int:
    """Position of a module in LAYERS; the package's own __init__/__main__ sit on top."""
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else len(LAYERS)


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """mobileone modules imported at module level, and those imported inside functions (delayed)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    top, delayed = set(), set()

    def resolve(node: ast.ImportFrom) -> list[str]:
        if node.level:
            base = package.split(".")
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        return [prefix] + [f"{prefix}.{a.name}" for a in node.names]

    def visit(node: ast.AST, in_function: bool, in_type_checking: bool) -> None:
        for child in ast.iter_child_nodes(node):
            func = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            typing_only = in_type_checking or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                names = resolve(child)
            modules = {n for n in names if n.split(".")[0] == "mobileone" and _is_module(n)}
            if modules and not typing_only:
                (delayed if func else top).update(modules)
            visit(child, func, typing_only)

    visit(tree, False, False)
    return top - {module}, delayed - {module}


def _is_module(name: str) -> bool:
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _graph() -> dict[str, tuple[set[str], set[str]]]:
    return {_module_name(p): _imports(p) for p in sorted(PACKAGE.rglob("*.py"))}


def test_imports_run_one_way_without_cycles():
    graph = _graph()
    upward = [f"{m} -> {d}" for m, (top, _) in graph.items() for d in top if _layer(d) > _layer(m)]
    assert not upward, f"imports from a lower layer to a higher one: {upward}"
    # A cycle among module-level imports (a package __init__ importing its own modules is not one).
    edges = {m: {d for d in top if not m.startswith(d + ".") and d in graph} for m, (top, _) in graph.items()}
    state: dict[str, int] = {}

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in edges[m]:
            if state.get(d) == 1:
                pytest.fail(f"import cycle: {' -> '.join(path[path.index(d) :] + [d])}")
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in edges:
        if m not in state:
            visit(m, [m])


def test_delayed_imports_only_where_optional_extras_need_them():
    # Delayed imports of our own modules dodge nothing but optional third-party packages: only the
    # command line (its subcommands need torchvision, onnx, ...) and the package's lazy names may.
    allowed = {"mobileone", "mobileone.cli"}
    offenders = {m: sorted(d) for m, (_, d) in _graph().items() if d and m not in allowed}
    assert not offenders, f"delayed imports of mobileone modules: {offenders}"


def test_every_module_imports_and_the_core_needs_torch_alone():
    modules = sorted(m for m in _graph() if not m.endswith("__main__"))
    code = (
        "import sys, importlib\n"
        "import mobileone\n"
        "mobileone.create_model('s0'); mobileone.reparameterize_model(mobileone.create_model('mu0').eval())\n"
        "heavy = [m for m in ('torchvision', 'onnx', 'onnxruntime', 'matplotlib', 'PIL') if m in sys.modules]\n"
        "assert not heavy, f'import mobileone pulled in {heavy}'\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]


class RepConvBN(nn.Module):
    """A user's own re-parameterizable block (RepVGG-style 3x3 + 1x1 conv-BN branches)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv3, self.bn3 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv1, self.bn1 = nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c)
        self.fused: nn.Conv2d | None = None

    @property
    def inference_mode(self) -> bool:
        return self.fused is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused is not None:
            return self.fused(x)
        return self.bn3(self.conv3(x)) + self.bn1(self.conv1(x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        fused = nn.Conv2d(self.conv3.in_channels, self.conv3.out_channels, 3, padding=1).to(self.conv3.weight)
        fused.weight.zero_()
        fused.bias.zero_()
        for conv, bn in ((self.conv3, self.bn3), (self.conv1, self.bn1)):
            scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
            kernel = nn.functional.pad(conv.weight, [(3 - conv.kernel_size[0]) // 2] * 4)
            fused.weight += kernel * scale[:, None, None, None]
            fused.bias += bn.bias - bn.running_mean * scale
        self.fused = fused
        del self.conv3, self.bn3, self.conv1, self.bn1


class Composite(nn.Module):
    """A backbone + head model as a detector or segmenter is built: MobileOne features, a user's head."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = create_model(
            MobileOneConfig(widths=(8, 16, 16, 16), stem_width=8, blocks=(1, 1, 1, 1), k=2),
            features_only=True,
            out_indices=(3,),
        )
        self.head = nn.Sequential(RepConvBN(16), nn.ReLU(), nn.Conv2d(16, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x)[0])


def test_fusion_of_a_composite_model_with_a_user_defined_reparameterizable_head():
    torch.manual_seed(0)
    model = settle_bn(Composite().double(), shape=(4, 3, 32, 32))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        expected = model(x)
        fused = reparameterize_model(model)
        assert fused.head[0].inference_mode and fused.backbone.inference_mode
        assert not any(isinstance(m, nn.BatchNorm2d) for m in fused.modules())
        torch.testing.assert_close(fused(x), expected, rtol=1e-9, atol=1e-9)
    assert not model.head[0].inference_mode  # a copy unless inplace
    with pytest.warns(FusionWarning, match="already re-parameterized"):
        reparameterize_model(fused)
    with pytest.raises(ValueError, match="reparameterize"):
        reparameterize_model(nn.Sequential(nn.Conv2d(3, 3, 1)))


def test_benchmark_scripts_import():
    # The scripts behind the README's tables are not part of the package; importing them catches
    # the import paths that a layout change leaves stale (their __main__ blocks do not run).
    import importlib.util

    for path in sorted((PACKAGE.parent / "experiments").glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        try:
            spec.loader.exec_module(module)
        finally:
            del sys.modules[spec.name]
