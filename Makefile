# Two commands for a fresh machine: `make demo` (the built-in default, end to end) and `make test`.
# Each creates .venv and installs what it needs, at the exact versions of constraints.txt (the lock file;
# pyproject.toml keeps compatible ranges). torch is pinned so a CPU machine takes the CPU wheel.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PIP_INSTALL := $(PY) -m pip install --progress-bar on -c constraints.txt

$(VENV)/.installed: setup.py pyproject.toml constraints.txt
	@echo "== installing into $(VENV) (torch CPU wheel, then saeuron and its pinned dependencies; a few minutes)"
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --progress-bar on --upgrade pip
	$(PIP_INSTALL) "$(TORCH)"
	$(PIP_INSTALL) -e ".[test,kernels]"
	@echo "== installed: $$($(PY) -c 'import torch, diffusers, transformers; print("torch", torch.__version__, "diffusers", diffusers.__version__, "transformers", transformers.__version__)')"
	@echo "== building the C++ extension once (the kernels are built just in time on first use; this is that use)"
	$(PY) -c "from saeuron import ops; print('   backends:', ops.status()['ops'])"
	touch $@

install: $(VENV)/.installed

test: $(VENV)/.installed
	TRITON_INTERPRET=1 $(PY) -m pytest tests -q -ra

demo: $(VENV)/.installed
	$(VENV)/bin/saeuron demo --out demo_out

bench: $(VENV)/.installed
	$(PY) -m pytest benchmarks/ --benchmark-only

.PHONY: install test demo bench
