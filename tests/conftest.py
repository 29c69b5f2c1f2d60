import mlx.core as mx
import pytest


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
