"""CMAlign public entry points (placeholder: forwards to the reference until the kernels land)."""
from .reference import CMAlignOutput, cmalign, person_mask, soft_warp  # noqa: F401
