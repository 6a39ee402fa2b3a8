# The README's commands.  `make demo` and `make test` each set up everything
# they need on a fresh machine (a virtual environment in .venv with the CPU
# build of torch, then reid_kernels built in place) and skip what is done.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.reid_kernels-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cpp csrc/*/*.cpp csrc/*/*.h csrc/*/*.cu csrc/*/*.cuh)

.PHONY: install demo test bench cuda-check clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "setuptools>=64" wheel
	# Pinned: an unpinned torch would make pip pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==$(TORCH_VERSION)
	# No build isolation: build against the torch installed above.
	$(BIN)/python -m pip install -q --no-build-isolation -e '.[test,faiss]'
	touch $@

demo: install
	$(BIN)/python -m training.demo

test: install
	$(BIN)/python -m pytest -q tests

bench: install
	$(BIN)/python benchmarks/bench_cmalign.py --device cpu

# Compile + link the CUDA kernels (needs nvcc, not a GPU); see .ci/cuda_check.sh.
cuda-check:
	bash .ci/cuda_check.sh

clean:
	rm -rf build $(VENV) reid_kernels/*.so *.egg-info
