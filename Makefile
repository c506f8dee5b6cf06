# seqwrap - one-command set-up, build, test, demo, sanitizer run and benchmarks.
#
#   make demo     venv + torch + deps + build, then the long-context training demo
#   make test     venv + torch + deps + build, then the test suite
#   make asan     AddressSanitizer + UBSan build of the C core, C-facing tests under it
#   make bench    benchmarks (tables and plots under benchmarks/results/)
#   make gpu-check      on a CUDA machine: build for its GPU, kernel checks, sanitizers, engines on the
#                       device, benchmarks (under 8 min on an H100/H200) -> benchmarks/results/gpu/
#   make gpu-check-dry  the same script on the CPU at toy sizes (what CI runs of it)
#
# Your own torch: point VENV at an environment that already has it and leave
# TORCH_SPEC empty, e.g. `make test VENV=$$CONDA_PREFIX TORCH_SPEC=`.

PYTHON     ?= python3
VENV       ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY         := $(VENV)/bin/python
STAMP      := $(VENV)/.seqwrap-deps
ASAN_DIR   := build/asan
PYTEST_ARGS ?=

.PHONY: all venv build test demo asan bench gpu-check gpu-check-dry clean

all: test

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=77" wheel
	@if [ -n "$(TORCH_SPEC)" ]; then echo "installing $(TORCH_SPEC)"; $(PY) -m pip install --quiet "$(TORCH_SPEC)"; \
	 else echo "TORCH_SPEC is empty: using the torch already in $(VENV)"; fi
	$(PY) -c "import torch; print('torch', torch.__version__)"
	$(PY) -m pip install --quiet --no-build-isolation -e ".[hf,dev]"
	@touch $(STAMP)

venv: $(STAMP)

# Incremental build of seqwrap._C in place; prints what it found and skipped (nvcc, archs, flags).
build: $(STAMP)
	$(PY) setup.py --quiet build_ext --inplace
	@cat build/build-summary.txt
	$(PY) -c "import seqwrap; print('seqwrap', seqwrap.__version__, seqwrap._C.build_info()); print(seqwrap.cuda_status())"

# The whole suite, then the C-facing part again under AddressSanitizer + UBSan.
test: build
	$(PY) -m pytest tests $(PYTEST_ARGS)
	$(MAKE) --no-print-directory asan

demo: build
	$(PY) -m seqwrap.demo

# Sanitized copy of the package (and of tests/) under build/asan; the tests marked `ccore` run against it.
asan: $(STAMP)
	rm -rf $(ASAN_DIR) && mkdir -p $(ASAN_DIR)/seqwrap
	SEQWRAP_SANITIZE=1 $(PY) setup.py --quiet build_ext --build-lib $(ASAN_DIR) --build-temp build/asan-tmp --force
	cd seqwrap && find . -name '*.py' -exec cp --parents {} ../$(ASAN_DIR)/seqwrap/ \;
	cp -r tests $(ASAN_DIR)/tests   # run from there so pytest puts build/asan first on sys.path
	LD_PRELOAD="$$(gcc -print-file-name=libasan.so) $$(gcc -print-file-name=libubsan.so)" \
	ASAN_OPTIONS=detect_leaks=0:abort_on_error=1 UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
	SEQWRAP_EXPECT_SANITIZE=1 PYTHONPATH=$(ASAN_DIR) \
	$(PY) -m pytest $(ASAN_DIR)/tests -m ccore -p no:cacheprovider $(PYTEST_ARGS)

bench: build
	$(PY) -m pytest benchmarks -s $(PYTEST_ARGS)

# The interpreter whose torch sees a CUDA device: the venv's, else python3 (a GPU machine's own image,
# where the venv's CPU torch does not apply). Override with GPU_PY=...; output folder: SEQWRAP_GPU_OUT.
GPU_PY ?= $(or $(shell for p in $(PY) $(PYTHON); do command -v $$p >/dev/null 2>&1 && \
	$$p -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null && { echo $$p; break; }; done),$(PYTHON))
GPU_CHECK_ARGS ?=

# No venv step on purpose: a GPU machine may have no package index; the script builds seqwrap._C itself
# (SEQWRAP_CUDA_ARCH from the visible GPU) and says so, and exits non-zero, when there is no GPU.
gpu-check:
	PYTHONUNBUFFERED=1 $(GPU_PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

gpu-check-dry: build
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.gpu_check --dry $(GPU_CHECK_ARGS)

clean:
	rm -rf build seqwrap/_C*.so *.egg-info .pytest_cache
