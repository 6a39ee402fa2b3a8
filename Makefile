# The README's commands.  `make demo` and `make test` each set up everything
# they need on a fresh machine (a virtual environment in .venv with the CPU
# build of torch, then reid_kernels built in place) and skip what is done.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.reid_kernels-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: install demo pretrain demo-pretrained test bench docs cuda-check gpu-check gpu-check-dry clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "setuptools>=64" wheel
	# Pinned: an unpinned torch would make pip pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	# No build isolation: build against the torch installed above.
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[test,faiss,onnx]'
	touch $@

# The demo runs with the reproducible CPU setting (training/reproducible.py: torch's CPU kernels
# pinned to AVX2, so the README's figures come out on any x86-64 CPU with AVX2);
# `make demo DEMO_ARGS=--no-reproducible` runs this CPU's own kernels instead.
DEMO_ARGS ?=
demo: install
	$(BIN)/python -m training.demo $(DEMO_ARGS)

# The demo from a backbone pretrained on a separate synthetic set (training/pretrain.py; about 4
# minutes on one core, cached in runs/pretrain: a second call reuses it), then the LbA rows.
pretrain: install
	$(BIN)/python -m training.pretrain --out runs/pretrain

demo-pretrained: pretrain
	$(BIN)/python -m training.demo --out runs/demo_pretrained --pretrain runs/pretrain $(DEMO_ARGS)

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/bench_cmalign.py --device cpu

# The API reference from the docstrings (pdoc, from PyPI), every warning an error: build/docs/.
docs: install
	$(BIN)/python -m pip install -q pdoc
	$(BIN)/python scripts/build_docs.py --out build/docs

# Compile + link the CUDA kernels (needs nvcc, not a GPU); see .ci/cuda_check.sh.
cuda-check:
	bash .ci/cuda_check.sh

# The GPU proof, on a machine with a GPU, nvcc and compute-sanitizer (a lent H100/H200): builds
# the CUDA kernels for sm_90 in place, runs the CUDA tests, memcheck and racecheck, the benchmarks,
# and writes JSON under OUT_DIR (default benchmarks/results/gpu/<date>/) in under 8 minutes.
# It uses that machine's python3 (its torch), not .venv.  COMMIT: the commit being checked (a lent
# machine gets the working tree without .git).  See scripts/gpu_check.py.
GPU_PYTHON ?= python3
OUT_DIR ?=
COMMIT ?=
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py $(if $(OUT_DIR),--out-dir "$(OUT_DIR)") $(if $(COMMIT),--commit "$(COMMIT)")

# The same script on a CPU machine, without the GPU parts (what CI runs): the pytest selection,
# the kernel driver and the benchmarks on the CPU at tiny sizes, the JSON and its schema check.
gpu-check-dry: install
	$(BIN)/python scripts/gpu_check.py --dry-run $(if $(OUT_DIR),--out-dir "$(OUT_DIR)")

clean:
	rm -rf build $(VENV) reid_kernels/*.so *.egg-info
