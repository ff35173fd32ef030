# Quickstart targets (see README.md). Everything installs into a local virtual
# environment; torch is pinned to the CPU build so no multi-GB CUDA wheel is pulled.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CLI := $(VENV)/bin/cunet-optimize
TORCH_PIN := torch==2.13.0
WORKDIR ?= .

.PHONY: install test demo clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q

# The main job on the embedded default model: INT8 build for the CPU target (calibration,
# export, surgery, lint, ONNX Runtime engine, accuracy gate), then profile + HTML report.
demo: install
	$(CLI) build --precision int8 --target cpu --workdir $(WORKDIR) --force
	$(CLI) profile --workdir $(WORKDIR)

clean:
	rm -rf $(VENV) build *.egg-info toolkit/*.egg-info
