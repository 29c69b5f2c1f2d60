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


class KernelRecorder:
    """Stands in for mx.fast.metal_kernel or mx.fast.cuda_kernel on the CPU:
    keeps each kernel's arguments and each call's, and returns zeros."""

    def __init__(self):
        self.kernels = []
        self.calls = []

    def __call__(self, **spec):
        self.kernels.append(spec)

        def call(**kwargs):
            self.calls.append(dict(kwargs, kernel=spec))
            return [mx.zeros(s, d) for s, d in zip(kwargs["output_shapes"], kwargs["output_dtypes"])]

        return call


@pytest.fixture
def kernel_recorder():
    return KernelRecorder()
