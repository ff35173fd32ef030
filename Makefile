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

# TensorRT's API surface for tests/test_trt_api_surface.py: type stubs only, kept off
# sys.path (--target): the wheel depends on the real TensorRT bindings, which do not
# install here, and its stub-only tensorrt/ folder would import as an empty package.
TRT_STUBS := $(VENV)/tensorrt-stubs
TRT_STUBS_PIN := tensorrt-stubs==10.13.0.35.1
$(TRT_STUBS)/.installed: $(VENV)/.installed
	$(PY) -m pip install --quiet --no-deps --target $(TRT_STUBS) '$(TRT_STUBS_PIN)'
	touch $@

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PIN)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

test: install $(TRT_STUBS)/.installed
	CUNET_TRT_STUBS=$(abspath $(TRT_STUBS)) $(PY) -m pytest -q -n auto --maxprocesses=4 --dist loadfile

# The main job on the embedded default model: INT8 build for the CPU target (calibration,
# export, surgery, lint, ONNX Runtime engine, accuracy gate), then profile + HTML report.
demo: install
	$(CLI) build --precision int8 --target cpu --workdir $(WORKDIR) --force
	$(CLI) profile --workdir $(WORKDIR)

clean:
	rm -rf $(VENV) build *.egg-info toolkit/*.egg-info
