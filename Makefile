# Two entry points: `make demo` and `make test`. Each creates .venv when missing.
#
# torch: a CPU-only machine gets CPU torch==2.13.0 installed first, so pip never pulls the
# multi-GB CUDA build. To use your own torch (CUDA, ROCm, another version), install it into
# .venv first (or set TORCH_SPEC / TORCH_INDEX): `make` keeps any torch it finds there.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: demo test bench clean-venv wheelhouse gpu-check

# The benchmark harness (benchmarks/, `cherry bench`) is its own distribution, installed beside Cherry:
# the test suite runs its tests, and its child processes import it from the install (docs/benchmarks.md).
$(VENV)/.installed: pyproject.toml benchmarks/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH_SPEC)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m pip install -q -e ".[test]"
	$(PY) -m pip install -q -e ./benchmarks
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/cherry demo --headless

# Lint (ruff: pyflakes, import order, pycodestyle), then the whole suite, slow tests included
# (plain `pytest` skips those for a quick loop), the 25 slowest listed at the end. pyproject's addopts
# run it on one pytest-xdist worker per core (`-n auto`).
test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -m "slow or not slow" --durations=25

# Cherry against TRL (the bench extra installs TRL; .venv/.installed the harness) on the tiny shape;
# docs/benchmarks.md has the others.
bench: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[bench]"
	$(VENV)/bin/cherry bench dpo --against trl --shape tiny

clean-venv:
	rm -rf $(VENV)

# Wheels for a GPU machine without network (docs/gpu.md): everything Cherry and the GPU check need
# except torch, for CPython $(WHEEL_PYTHON) on manylinux x86_64. WHEELHOUSE_SKIP: distributions the
# target already has (comma-separated), to stay small.
WHEEL_PYTHON ?= 3.12
# Default: numpy, pandas and pyarrow, which CUDA images with PyTorch already ship (118 MiB with them,
# about 40 without; the GPU machine takes 64 MiB); `make wheelhouse WHEELHOUSE_SKIP=` collects them too.
WHEELHOUSE_SKIP ?= pyarrow,pandas,numpy
wheelhouse: $(VENV)/.installed
	$(PY) scripts/wheelhouse.py --dest wheelhouse --python-version $(WHEEL_PYTHON) --skip "$(WHEELHOUSE_SKIP)"

# On the GPU machine (CUDA torch, no network): scripts/gpu-check.sh; here, the plan and the wheelhouse check.
gpu-check:
	scripts/gpu-check.sh --dry-run
