# Two entry points set up a fresh machine from nothing (see README):
#   make run    the main job: the T2V-Turbo-v2 demo on the toy world (report in demo-report/)
#   make test   the whole test suite
# Both create or refresh .venv and install the package there, with the CUDA extension when a
# CUDA toolkit is present.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
# The CUDA build of torch these machines carry on disk; override for another machine.
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.turbo-kernels-installed
SOURCES := setup.py pyproject.toml $(wildcard csrc/*.cu csrc/*.cpp csrc/*.h)

.PHONY: run test venv bench report clean

venv: $(STAMP)

$(STAMP): $(SOURCES)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/t2v-turbo demo --output-dir demo-report

bench: $(STAMP)
	$(VENV)/bin/t2v-turbo bench

report: $(STAMP)
	$(PY) -m turbo_kernels.kernel_report

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info turbo_kernels/_C*.so
