# One entry point per job; each creates .venv (Python 3.12) when missing.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
PYENV_ROOT ?= $(HOME)/.pyenv

# python3.12 on PATH first (containers, ordinary machines); then a pyenv install. A pyenv
# shim that cannot run is rejected by the --version probe.
PYTHON312 := $(shell for p in python3.12 $(PYENV_ROOT)/versions/3.12*/bin/python3.12; do \
	$$p --version >/dev/null 2>&1 && { echo $$p; break; }; done)

.PHONY: venv test demo clean

$(VENV)/.installed: pyproject.toml constraints-cpu.txt
	@test -n "$(PYTHON312)" || { echo "error: Python 3.12 not found (install python3.12 or pyenv install 3.12)" >&2; exit 1; }
	test -x $(PY) || $(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints-cpu.txt -e '.[test]'
	touch $@

venv: $(VENV)/.installed

test: venv
	$(PY) -m pytest -q tests

demo: venv
	$(PY) -m megatron_focusft.cli demo

clean:
	rm -rf $(VENV) build *.egg-info
