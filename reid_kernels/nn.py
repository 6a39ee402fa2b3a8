"""torch.nn modules built on reid_kernels operators."""
import torch  # noqa: F401
