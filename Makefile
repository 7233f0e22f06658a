# The two commands of the README: `make demo` (train the default pair, print k-NN) and `make test`.
# Both set up everything first (venv, packages, the Fashion-MNIST Debian package) and are quick once set up.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mokd-installed
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions

.PHONY: setup demo test fashion-mnist clean

setup: $(STAMP) fashion-mnist

# torch first, pinned to the CUDA build that runs on CPU too (torchvision 0.29 needs torch 2.14).
$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

fashion-mnist:
	@dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || \
		{ $(SUDO) apt-get update -qq && $(SUDO) apt-get install -y -qq dataset-fashion-mnist; }

demo: setup
	$(PY) -m mokd.launch.cli train --preset demo $(ARGS)

test: setup
	$(PY) -m pytest tests -q $(ARGS)

clean:
	rm -rf $(VENV) .cache runs
