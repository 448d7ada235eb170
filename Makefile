# Set-up and the two entry points promised by README.md.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test test-fast demo bench lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision pinned: these wheels are on the build machines' disk (other versions download GBs).
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,bench]'
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests -n auto --dist loadfile --durations=25

# The edit-test loop: everything but the tests marked slow (pyproject.toml lists what slow means).
test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(PY) -m pytest -q tests -n auto --dist loadfile --durations=10 -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check mmsoftmoe training eval benchmarks tests

demo: $(STAMP)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(VENV)/bin/mmsoftmoe demo

clean:
	rm -rf $(VENV) .pytest_cache
