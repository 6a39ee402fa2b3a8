"""Build of reid_kernels and its one compiled extension, ``reid_kernels._C``.

The C++ (CPU) kernels are always compiled.  The CUDA kernels are compiled
when CUDA is usable -- torch was built with CUDA and a CUDA toolkit (nvcc) is
found -- or when ``FORCE_CUDA=1`` (torchvision's convention).
``REID_KERNELS_NO_CUDA=1`` skips them even when CUDA is usable.

Install without build isolation so pip reuses the torch you already have
instead of resolving (and downloading) a new one::

    pip install --no-build-isolation .
"""
import glob
import os
import re
import shutil
import site
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _toolkit_behind(nvcc):
    """The CUDA toolkit root that an ``nvcc`` on PATH belongs to.

    Some machines put a two-line wrapper script ``exec /usr/local/cuda-X/bin/nvcc "$@"``
    on PATH; torch would then guess the wrapper's parent directory as CUDA_HOME.
    """
    real = os.path.realpath(nvcc)
    home = os.path.dirname(os.path.dirname(real))
    if os.path.exists(os.path.join(home, "include", "cuda.h")):
        return home
    try:
        with open(real, "r", errors="ignore") as f:
            text = f.read(4096)
    except OSError:
        return None
    match = re.search(r"(/\S+)/bin/nvcc\b", text)
    if match and os.path.exists(os.path.join(match.group(1), "include", "cuda.h")):
        return match.group(1)
    return None


def _find_cuda_home():
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = _toolkit_behind(nvcc)
        if home:
            return home
    if os.path.exists("/usr/local/cuda/include/cuda.h"):
        return "/usr/local/cuda"
    return None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: settle it first.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _want_cuda():
    if os.environ.get("REID_KERNELS_NO_CUDA", "0") == "1":
        return False
    if os.environ.get("FORCE_CUDA", "0") == "1":
        return True
    return torch.version.cuda is not None and _cuda_home is not None


def _pip_cuda_include_dirs():
    """Headers of the pip CUDA wheels (cuBLAS, cuSPARSE, ...) that torch's CUDA headers include."""
    dirs = []
    for base in site.getsitepackages() + [site.getusersitepackages()]:
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "nvidia", "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _extension():
    cpp_sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "*", "*.cpp")))
    cuda_sources = sorted(glob.glob(os.path.join("csrc", "*", "*.cu")))
    # -ffp-contract=off: no a * b + c fused into an FMA, so the element-wise loops that csrc/cpu_isa.h
    # compiles for AVX-512, AVX2 and the generic target round alike on every CPU, and cancellations the
    # kernels rely on (w * D - centre with a one-hot softmax row) stay exact.
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-ffp-contract=off"]
    extra_link = ["-fopenmp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    if not _want_cuda():
        return CppExtension(
            "reid_kernels._C",
            cpp_sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags},
            extra_link_args=extra_link,
        )
    # Ampere (A100) and Hopper (H100/H200) unless the user says otherwise.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;8.6;9.0")
    nvcc_flags = ["-O3", "-std=c++20", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension(
        "reid_kernels._C",
        cpp_sources + cuda_sources,
        include_dirs=include_dirs + _pip_cuda_include_dirs(),
        define_macros=[("WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx_flags + ["-DWITH_CUDA"], "nvcc": nvcc_flags},
        extra_link_args=extra_link,
    )


# One top-level package.  The training application lives in the repository's training/ folder
# (the layout the project asks for, and `python -m training.<x>` from the checkout) but installs as
# reid_kernels.training: a library must not claim a generic top-level name such as `training`.
# Mechanism: package_dir maps the dotted name onto the folder.  A wheel then holds
# reid_kernels/training/ as real files; the editable install (`make install`) maps the name to
# the folder with setuptools' import finder, so `python -m pytest` from the repository root (where
# the checkout's reid_kernels/ comes first on sys.path and has no training/ inside) still finds
# reid_kernels.training, and no second copy of the code exists.  The alternative, a committed
# symlink reid_kernels/training -> ../training, depends on the file system and on git keeping
# symlinks (core.symlinks is off on Windows checkouts) and is what sdists handle least well.
TRAINING = "reid_kernels.training"


def _packages():
    training = find_packages(where="training")
    return (find_packages(include=["reid_kernels", "reid_kernels.*"])
            + [TRAINING] + [f"{TRAINING}.{name}" for name in training])


# The console commands (training/commands.py); same arguments as `python -m training.<module>`.
COMMANDS = [f"reid-{name} = {TRAINING}.commands:{name}" for name in ("train", "evaluate", "demo", "synth", "visualize",
                                                                    "pretrain", "index", "search", "export")]

setup(
    name="reid_kernels",
    version="0.1.0",
    description="Fused CPU/CUDA kernels, retrieval and evaluation for visible-infrared person re-identification",
    packages=_packages(),
    package_dir={TRAINING: "training"},
    package_data={TRAINING: ["configs/*.yaml"]},
    include_package_data=False,
    entry_points={"console_scripts": COMMANDS},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "scipy", "pyyaml", "tqdm", "pillow"],
    extras_require={"test": ["pytest"], "faiss": ["faiss-cpu"], "onnx": ["onnx", "onnxruntime"], "docs": ["pdoc"]},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)},
    zip_safe=False,
)
