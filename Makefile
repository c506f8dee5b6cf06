# seqwrap - one-command set-up, build, test, demo, sanitizer run and benchmarks.
#
#   make demo         venv + torch + locked deps + build, then the long-context training demo
#   make test         venv + torch + locked deps + build, then the test suite (+ the ASan/UBSan run)
#   make test-latest  the suite on the newest transformers / peft / test tools (own venv: .venv-latest);
#                     fails when the newest on the index could not be installed (FORCE_NEWEST=1: --no-deps)
#   make test-oldest  the suite at the supported floors (requirements/oldest.txt; own venv: .venv-oldest)
#   make test-torch-next  the suite on the next torch (TORCH_NEXT, default torch==2.14.1; .venv-torch-next)
#   make lock         write .venv-latest's versions into requirements/lock.txt (after test-latest passed)
#   make asan         AddressSanitizer + UBSan build of the C core, C-facing tests under it
#   make bench        benchmarks (tables and plots under benchmarks/results/)
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
LOCK       := requirements/lock.txt
OLDEST     := requirements/oldest.txt
ASAN_DIR   := build/asan
PYTEST_ARGS ?=
# development and CI builds treat compiler warnings as errors (a user's pip install does not)
export SEQWRAP_WERROR := 1

# The dependencies of the hf and dev extras, names and floors as pyproject.toml declares them.
EXTRAS = $$($(PYTHON) -c "import tomllib; d = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']; print(' '.join(d['hf'] + d['dev']))")

.PHONY: all venv build test demo asan bench gpu-check gpu-check-dry clean test-latest test-oldest test-torch-next lock

all: test

$(STAMP): pyproject.toml setup.py $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=77" wheel
	@if [ -n "$(TORCH_SPEC)" ]; then echo "installing $(TORCH_SPEC)"; $(PY) -m pip install --quiet "$(TORCH_SPEC)"; \
	 else echo "TORCH_SPEC is empty: using the torch already in $(VENV)"; fi
	$(PY) -c "import torch; print('torch', torch.__version__)"
	$(PY) -m pip install --quiet --no-build-isolation -c $(LOCK) -e ".[hf,dev]"
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

# The version matrix. Each column has its own venv with torch $(TORCH_SPEC) (test-torch-next: $(TORCH_NEXT))
# and imports the extension that `build` compiled in place (same Python; the extension links no libtorch, so
# one build serves every torch). Outside the declared range the suite runs
# anyway (SEQWRAP_ALLOW_UNSUPPORTED_VERSIONS=1), so that it shows what really breaks; the one test
# tests/test_hf_versions.py::test_installed_versions_are_in_the_supported_range names the range.
define matrix_venv
	@test -x $(1)/bin/python || $(PYTHON) -m venv $(1)
	$(1)/bin/python -m pip install --quiet --upgrade pip "setuptools>=77" wheel
	@if [ -n "$(or $(3),$(TORCH_SPEC))" ]; then $(1)/bin/python -m pip install --quiet "$(or $(3),$(TORCH_SPEC))"; fi
	$(1)/bin/python -m pip install --quiet --no-build-isolation $(2) $(if $(3),"$(3)")
	$(1)/bin/python -c "import torch, transformers, peft; print('matrix column:', '$(1)', 'torch', torch.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)"
endef

# The column prints the versions it really resolved against the newest on the index (tools/latest_versions.py),
# runs the suite, prints them again and fails when the newest release could not be installed.
# FORCE_NEWEST=1 installs such a release with --no-deps first (the table says so and why).
FORCE_NEWEST ?=
test-latest: build
	$(call matrix_venv,.venv-latest,--upgrade $(EXTRAS))
	@versions=0; .venv-latest/bin/python tools/latest_versions.py $(if $(FORCE_NEWEST),--force) \
	   --report build/latest-versions.txt || versions=$$?; \
	 SEQWRAP_ALLOW_UNSUPPORTED_VERSIONS=1 PYTHONPATH=$(CURDIR) .venv-latest/bin/python -m pytest tests \
	   -p no:cacheprovider $(PYTEST_ARGS); suite=$$?; \
	 echo; cat build/latest-versions.txt; \
	 if [ $$versions -ne 0 ]; then echo "test-latest FAILED: not the newest releases (above)"; fi; \
	 test $$suite -eq 0 -a $$versions -eq 0

# The next torch on this machine's disk, with the locked transformers / peft (own venv: .venv-torch-next).
TORCH_NEXT ?= torch==2.14.1
test-torch-next: build
	$(call matrix_venv,.venv-torch-next,-c $(LOCK) $(EXTRAS),$(TORCH_NEXT))
	PYTHONPATH=$(CURDIR) .venv-torch-next/bin/python -m pytest tests -p no:cacheprovider $(PYTEST_ARGS)

test-oldest: build
	$(call matrix_venv,.venv-oldest,-c $(OLDEST) $(EXTRAS))
	PYTHONPATH=$(CURDIR) .venv-oldest/bin/python -m pytest tests -p no:cacheprovider $(PYTEST_ARGS)

# Moves the lock to what .venv-latest holds (run after `make test-latest` passed), then raise the
# ceilings in seqwrap/hf/versions.py if the newest releases are past them.
lock:
	@test -x .venv-latest/bin/python || { echo "run make test-latest first"; exit 1; }
	{ sed -n '1,3p' $(LOCK); .venv-latest/bin/python -m pip freeze | grep -v -e '^-e' -e '^seqwrap' -e '^torch=='; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)
	@echo "requirements/lock.txt updated; commit it with the versions.py change"

bench: build
	$(PY) -m pytest benchmarks -s $(PYTEST_ARGS)

# The interpreter whose torch sees a CUDA device: the venv's, else python3 (a GPU machine's own image,
# where the venv's CPU torch does not apply). Override with GPU_PY=...; output folder: SEQWRAP_GPU_OUT.
GPU_PY ?= $(or $(shell for p in $(PY) $(PYTHON); do command -v $$p >/dev/null 2>&1 && \
	$$p -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null && { echo $$p; break; }; done),$(PYTHON))
GPU_CHECK_ARGS ?=

# No venv step on purpose: a GPU machine may have no package index; the script builds seqwrap._C itself
# (SEQWRAP_CUDA_ARCH from the visible GPU) and says so, and exits non-zero, when there is no GPU.
# The GPU image's own transformers may be outside the declared range: the check runs anyway and its
# log records the versions.
gpu-check:
	PYTHONUNBUFFERED=1 SEQWRAP_ALLOW_UNSUPPORTED_VERSIONS=1 $(GPU_PY) -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

gpu-check-dry: build
	PYTHONUNBUFFERED=1 $(PY) -m benchmarks.gpu_check --dry $(GPU_CHECK_ARGS)

clean:
	rm -rf build seqwrap/_C*.so *.egg-info .pytest_cache .venv-latest .venv-oldest .venv-torch-next
