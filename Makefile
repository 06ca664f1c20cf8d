# Two commands for a fresh machine: `make demo` (the built-in default, end to end) and `make test`.
# Each creates .venv and installs what it needs. torch is pinned so a CPU machine takes the CPU wheel.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: setup.py pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,kernels]"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q -ra

demo: $(VENV)/.installed
	$(VENV)/bin/saeuron demo --out demo_out

bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks/ --benchmark-only

.PHONY: install test demo bench
