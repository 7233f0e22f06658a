# The two commands of the README: `make demo` (train the default pair, print k-NN) and `make test`.
# Both set up everything first (venv, packages, the Fashion-MNIST Debian package) and are quick once set up.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mokd-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test fashion-mnist toolchain clean

setup: $(STAMP) fashion-mnist

# torch first, pinned to the CUDA build that runs on CPU too (torchvision 0.29 needs torch 2.14). Then mokd
# without build isolation: setup.py builds the native CPU kernels (CMakeLists.txt) against this venv's torch
# (an isolated build env would not see it, and must never download another multi-GB torch).
$(STAMP): setup.py CMakeLists.txt $(wildcard csrc/*)
	$(MAKE) toolchain
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet 'setuptools>=70.1'  # the build backend used without isolation (has bdist_wheel)
	$(PY) -m pip install --quiet --no-build-isolation -e '.[dev]'
	touch $(STAMP)

# cmake and a C++ compiler for the native kernels; best effort: without them the install still works.
toolchain:
	@{ command -v cmake && command -v c++; } >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq cmake g++; } || \
		echo "warning: no cmake/g++: the native CPU kernels will not be built (mokd uses its torch path)"

fashion-mnist:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

demo: setup
	$(PY) -m mokd.launch.cli train --preset demo $(ARGS)

test: setup
	$(PY) -m pytest tests -q $(ARGS)

clean:
	rm -rf $(VENV) .cache runs
