# Two commands on a fresh clone: `make demo` and `make test`. Both create .venv when missing.
# PyTorch is installed first: `pip install torch==2.13.0` takes the CPU build where it is present locally.
# On another machine choose the build with TORCH_INDEX_URL, e.g.
#   make test TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu      (CPU)
#   make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128    (CUDA)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
TORCH_INDEX_URL ?=
STAMP := $(VENV)/.installed
TORCH_INDEX := $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL),)

.PHONY: install demo test test-fast lint compile base-image images bench clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_INDEX) "torch==$(TORCH_VERSION)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rlhf run examples/demo.yaml

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow and not e2e"

lint: $(STAMP)
	$(VENV)/bin/ruff check components pipelines containers tests benchmarks
	$(VENV)/bin/ruff format --check components pipelines containers
	$(VENV)/bin/mypy components pipelines containers/pip_build_flags.py

compile: $(STAMP)
	$(VENV)/bin/rlhf compile --pipeline rlhf -o rlhf.yaml

# The component image (containers/Dockerfile), with podman or docker (CONTAINER_ENGINE=docker).
#   make images                                    CPU PyTorch: …/rlhf-pipelines:0.1.0-cpu
#   make images IMAGE_TORCH=cu128                  CUDA PyTorch: …/rlhf-pipelines:0.1.0-cu128
# BASE_IMAGE: the image to build on; the one `make base-image` made when it exists, else python:3.11-slim.
# IMAGE_BUILD_FLAGS: extra build flags; by default this machine's pip configuration, mounted for the build
# only (containers/pip_build_flags.py).
CONTAINER_ENGINE ?= podman
LOCAL_BASE_IMAGE ?= localhost/rlhf-base:bookworm
BASE_IMAGE ?= $(shell $(CONTAINER_ENGINE) image inspect $(LOCAL_BASE_IMAGE) >/dev/null 2>&1 \
	&& echo $(LOCAL_BASE_IMAGE) || echo python:3.11-slim)
IMAGE_TORCH ?= cpu
# The tag the components name (pipelines/components.py); RLHF_IMAGE names another for both.
RLHF_IMAGE ?= ghcr.io/rlhf-pipelines/rlhf-pipelines:0.1.0-$(IMAGE_TORCH)
IMAGE_BUILD_FLAGS ?= $(shell $(PYTHON) containers/pip_build_flags.py build/container-pip.conf $(TORCH_VERSION) $(IMAGE_TORCH))

base-image:
	containers/base-image.sh $(LOCAL_BASE_IMAGE)

images:
	$(CONTAINER_ENGINE) build -f containers/Dockerfile -t $(RLHF_IMAGE) \
		--build-arg BASE_IMAGE=$(BASE_IMAGE) --build-arg TORCH_VERSION=$(TORCH_VERSION) \
		--build-arg GIT_SHA=$$(git describe --always --dirty --abbrev=40 2>/dev/null || echo unknown) \
		--build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/$(IMAGE_TORCH) $(IMAGE_BUILD_FLAGS) .
	@$(CONTAINER_ENGINE) image inspect --format "{{.Size}}" $(RLHF_IMAGE) | awk '{printf "$(RLHF_IMAGE): %.2f GB\n", $$1 / 1e9}'

bench: $(STAMP)
	benchmarks/run.sh

clean:
	rm -rf .rlhf-demo .rlhf-demo-chat .rlhf-demo-arithmetic .rlhf-runs .rlhf-runs-chat kfp-local mlflow.db summary.json rlhf.yaml
