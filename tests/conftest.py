import contextlib
import importlib.util
import os

import pytest
import torch

import reid_kernels

# The checkout without an install (a lent GPU machine builds the extension in place only, see
# scripts/gpu_check.py): no finder maps reid_kernels.training onto training/, so let reid_kernels'
# path include the repository root, where the training/ folder is found as its subpackage.
if importlib.util.find_spec("reid_kernels.training") is None:
    reid_kernels.__path__.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def available_devices():
    devices = ["cpu"]
    if torch.cuda.is_available() and reid_kernels.has_cuda_kernels():
        devices.append("cuda")
    return devices


def _device_param(name):
    # The CUDA runs carry the `cuda` marker, so `pytest -m cuda tests` selects exactly the CUDA tests.
    return pytest.param(name, marks=pytest.mark.cuda) if name == "cuda" else name


@pytest.fixture(params=[_device_param(d) for d in available_devices()])
def device(request):
    """Every kernel test runs on the CPU, and on CUDA when a GPU and the CUDA build are present."""
    return torch.device(request.param)


# CUDA-only tests (no `device` fixture) use this mark: the `cuda` marker plus a skip without a GPU.
requires_cuda = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not (torch.cuda.is_available() and reid_kernels.has_cuda_kernels()),
        reason="needs a CUDA device and the CUDA build of reid_kernels",
    ),
]


@contextlib.contextmanager
def threads(n):
    """torch's intra-op thread count set to `n` inside the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
