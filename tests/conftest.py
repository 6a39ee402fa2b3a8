import pytest
import torch

import reid_kernels


def available_devices():
    devices = ["cpu"]
    if torch.cuda.is_available() and reid_kernels.has_cuda_kernels():
        devices.append("cuda")
    return devices


@pytest.fixture(params=available_devices())
def device(request):
    """Every kernel test runs on the CPU, and on CUDA when a GPU and the CUDA build are present."""
    return torch.device(request.param)
