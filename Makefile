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

# The GPU machines this project is lent run Triton 3.6 (with torch 2.11), whose compiler allocates
# registers differently from the Triton that torch 2.14 brings: `make report-gpu-triton` compiles
# every kernel with that Triton too (a venv that layers it over .venv's packages).
GPU_TRITON ?= triton==3.6.0
GPU_TRITON_VENV := .venv-gpu-triton
GPU_TRITON_STAMP := $(GPU_TRITON_VENV)/.installed

.PHONY: run test venv bench report report-gpu-triton clean

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

# Rebuilt with .venv: its layering file points into .venv's site-packages (purelib and platlib).
$(GPU_TRITON_STAMP): $(STAMP)
	rm -rf $(GPU_TRITON_VENV)
	$(PY) -m venv $(GPU_TRITON_VENV)
	$(GPU_TRITON_VENV)/bin/python -m pip install -q --no-deps "$(GPU_TRITON)"
	$(PY) -c "import sysconfig; paths = sysconfig.get_paths(); \
		print('import site; ' + '; '.join('site.addsitedir(%r)' % p for p in dict.fromkeys((paths['purelib'], paths['platlib']))))" \
		> "$$($(GPU_TRITON_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/turbo_kernels_base.pth"
	touch $@

report-gpu-triton: $(GPU_TRITON_STAMP)
	env -u TRITON_INTERPRET $(GPU_TRITON_VENV)/bin/python -m turbo_kernels.kernel_report

test: $(STAMP)
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) $(GPU_TRITON_VENV) build *.egg-info turbo_kernels/_C*.so
