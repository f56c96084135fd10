import pytest
import torch

from mobileone import MobileOneConfig, create_model

torch.set_num_threads(2)

TINY = MobileOneConfig(
    widths=(8, 16, 24, 32), stem_width=8, blocks=(1, 2, 2, 1), k=(2, 2, 3, 1), se_blocks=(0, 0, 1, 1)
)


def settle_bn(model: torch.nn.Module, shape=(4, 3, 32, 32), steps: int = 3) -> torch.nn.Module:
    """Fill BN running statistics with a few train-mode batches (cumulative average, momentum=None),
    so eval mode sees statistics of real activations rather than the initial mean 0, variance 1."""
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for bn in bns:
        bn.momentum = None
    model.train()
    p = next(model.parameters())
    with torch.no_grad():
        for _ in range(steps):
            model(torch.randn(*shape, dtype=p.dtype))
    for bn in bns:
        bn.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads, and spinning OpenMP threads crawl on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return settle_bn(create_model(TINY, num_classes=5))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny colour classes on disk (``train/`` and ``val/``): 3 steps an epoch at batch 8."""
    from .classify_data import make_data

    return make_data(tmp_path_factory.mktemp("data"))


@pytest.fixture
def tiny():
    """A 4-block MobileOne with the BN statistics of real activations, in eval mode."""
    from .classify_data import TINY

    torch.manual_seed(0)
    model = create_model(TINY, num_classes=3)
    model.train()(torch.randn(4, 3, 16, 16))
    return model.eval()
