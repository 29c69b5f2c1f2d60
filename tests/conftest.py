import mlx.core as mx
import pytest

from mtp_splitk import patch


def cuda_available() -> bool:
    try:
        return mx.cuda.is_available()
    except Exception:
        return False


def pytest_collection_modifyitems(config, items):
    if cuda_available():
        return
    skip = pytest.mark.skip(
        reason="needs MLX's CUDA backend; run on the GPU machine (see README, 'GPU checks')"
    )
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_patch_state():
    """Every test starts and ends unpatched, whatever it does in between."""
    patch.disable()
    yield
    patch.disable()
