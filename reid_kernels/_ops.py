"""Autograd and fake (meta) registrations of the compiled operators (torch.ops.reid_kernels.*).

Schemas are in csrc/ops.cpp; kernels in csrc/<op>/<op>_{cpu.cpp,cuda.cu}.
"""
import torch  # noqa: F401
