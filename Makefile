# FaaSMoE — `make run` starts a demo on a tiny built-in model, `make test` runs the suite.
# Both create .venv and install what they need on first use.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines get the pinned CPU-friendly build; a GPU box keeps a torch it already has
# (the venv sees system packages when the system python has torch) or gets the default CUDA build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
TINY_MODEL ?= models/tiny-qwen2_moe

.PHONY: install run test bench bench-paper bench-peer bench-compat clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	@if $(PYTHON) -c "import torch" >/dev/null 2>&1; then \
		echo "using the system torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else $(PYTHON) -m venv $(VENV); fi
	@$(PY) -c "import torch" >/dev/null 2>&1 || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e '.[dev]'
	@touch $@

$(TINY_MODEL)/config.json: | install
	$(VENV)/bin/faasmoe model init $(TINY_MODEL) --family qwen2_moe --preset tiny --seed 0

run: install $(TINY_MODEL)/config.json
	$(PY) examples/demo.py --model $(TINY_MODEL)

test: install
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q
	@echo "the CPU kernels again with the ISA masked to AVX2 (the paths an AVX2-only CPU takes):"
	ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -q tests/model/test_kernels.py tests/model/test_model.py

bench: install
	$(PY) bench/decode.py

PAPER_ARGS ?=
bench-paper: install
	$(PY) bench/paper.py $(PAPER_ARGS)

# FaaSMoE against vLLM's CPU build on this machine (installs vLLM into .venv-vllm/ on first use).
PEER_ARGS ?=
bench-peer: install
	$(PY) bench/peer.py $(PEER_ARGS)

# The clients users already run (lm-eval, vllm bench serve, guidellm, litellm, langchain-openai, openai, promtool)
# against faasmoe serve: prints the README's compatibility table (installs the heavy ones into .venv-compat/).
COMPAT_ARGS ?=
bench-compat: install
	$(PY) bench/compat.py $(COMPAT_ARGS)

clean:
	rm -rf $(VENV) models .pytest_cache
