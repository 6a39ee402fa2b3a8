"""pytest plugin of ``scripts/gpu_check.py``: keep exactly the tests that run CUDA code.

Loaded with ``-p gpu_check_select`` (``scripts/`` on ``PYTHONPATH``).  A test is kept when

* it carries the ``cuda`` marker (``pytest -m cuda`` selects the same ones), or
* one of its parameters is a CUDA device -- the ``device`` fixture of ``tests/conftest.py``
  adds ``cuda`` when a GPU and the CUDA build are present, so ``test_x[cuda]`` and
  ``test_x[float16-cuda]`` are kept and their ``[cpu]`` twins are not, or
* it has no CPU parameter and its name or a ``skipif`` reason speaks of CUDA / a GPU
  (``test_cuda_matches_cpu``, ``@skipif(not torch.cuda.is_available(), reason="needs a GPU")``).

Everything else -- the CPU kernels, training, the slow CPU-only tests -- is deselected, and
pytest's summary reports how many were.
"""
from __future__ import annotations

import re

_GPU_WORDS = re.compile(r"cuda|gpu", re.IGNORECASE)


_DEVICE_NAME = re.compile(r"(cuda|cpu)(:\d+)?")


def _param_device_types(item) -> set:
    """Device types ("cpu", "cuda") among the test's parameter values: torch.device objects and
    strings that are exactly a device name ("cuda", "cuda:0", "cpu")."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return set()
    types = set()
    for value in callspec.params.values():
        if type(value).__name__ == "device":  # torch.device, without importing torch here
            value = str(value)
        if isinstance(value, str) and _DEVICE_NAME.fullmatch(value):
            types.add(_DEVICE_NAME.fullmatch(value).group(1))
    return types


def _skip_reasons(item) -> str:
    return " ".join(str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif"))


def cuda_reason(item):
    """Why the collected test ``item`` exercises CUDA (see the module docstring), or None."""
    if item.get_closest_marker("cuda") is not None:
        return "cuda marker"
    devices = _param_device_types(item)
    if "cuda" in devices:
        return "cuda parameter"
    if "cpu" in devices:
        return None
    if _GPU_WORDS.search(getattr(item, "originalname", item.name)):
        return "name"
    if _GPU_WORDS.search(_skip_reasons(item)):
        return "skip reason"
    return None


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        reason = cuda_reason(item)
        if reason is None:
            drop.append(item)
        else:
            # In the JUnit XML (a <property> of the testcase), so the summary can count the tests
            # that ran CUDA code apart from those kept only for their name.
            item.user_properties.append(("gpu_check", reason))
            keep.append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
