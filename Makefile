# The README's two commands: `make demo` and `make test`. Both set up .venv first when needed.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.setup-stamp
DEMO_OUT ?= outputs/demo

.PHONY: setup test test-fast demo lint clean bench image image-test

setup: $(STAMP)

$(STAMP): pyproject.toml requirements/constraints.txt requirements/mmcv-build.txt tools/setup.sh
	PYTHON=$(PYTHON) bash tools/setup.sh
	touch $@

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check cvtk_job tests bench tools entrypoint.py

demo: $(STAMP)
	bash tools/demo.sh $(DEMO_OUT)

clean:
	rm -rf $(VENV) outputs .pytest_cache

bench: $(STAMP)
	$(PY) bench/run.py

# The CUDA image (pulls nvidia/cuda bases and torch from PyPI; compiles mmcv's CUDA ops).
IMAGE ?= cvtk-job:0.1.0
image:
	DOCKER_BUILDKIT=1 docker build -t $(IMAGE) .

# Build the image from this Dockerfile on a locally made CPU base with this machine's wheels, and run
# train/inference in it (what CI does; no registry needed).
image-test: $(STAMP)
	$(PY) -m pytest -q tests/integration/test_image.py
