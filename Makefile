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

.PHONY: install demo test test-fast lint compile images bench clean

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
	$(VENV)/bin/ruff check components pipelines tests benchmarks
	$(VENV)/bin/ruff format --check components pipelines
	$(VENV)/bin/mypy components pipelines

compile: $(STAMP)
	$(VENV)/bin/rlhf compile --pipeline rlhf -o rlhf.yaml

images:
	podman build -f containers/Dockerfile -t rlhf-pipelines:0.1.0-cpu .

bench: $(STAMP)
	benchmarks/run.sh

clean:
	rm -rf .rlhf-demo .rlhf-demo-chat .rlhf-demo-arithmetic .rlhf-runs .rlhf-runs-chat kfp-local mlflow.db summary.json rlhf.yaml
