# Everything starts from a bare Python 3.11: make creates .venv and installs into it.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := demo

.PHONY: install demo test test-reliability lint recipes bench clean

install: $(STAMP)

# torch is pinned first: the machine's local CPU wheel is 2.13.0; an unpinned torch pulls CUDA.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	$(BIN)/python -c 'from mergebuild.engine.methods import _kernels; _kernels.warm()'
	touch $(STAMP)

demo: install
	$(BIN)/mergebuild demo-models examples/models
	rm -rf $(DEMO)/cache
	@echo "== first build (cold cache: every node is built) =="
	$(BIN)/mergebuild examples/anything_nsfw_gape.yaml --cache-dir $(DEMO)/cache
	@echo "== second build (nothing to do: every node is a cache hit) =="
	$(BIN)/mergebuild examples/anything_nsfw_gape.yaml --cache-dir $(DEMO)/cache
	$(BIN)/mergebuild examples/anything_nsfw_gape.yaml --cache-dir $(DEMO)/cache --dry-run

test: install
	$(BIN)/python -m pytest -q -n 2

test-reliability: install
	MERGEBUILD_TEST_FRESH=1 $(BIN)/python -m pytest -q -m slow

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

recipes: install
	@for r in merge_recipes/*.yaml; do echo "== $$r"; $(BIN)/mergebuild "$$r" || exit 1; done

# sd-mecha (a pinned dev extra) is a comparison baseline only
bench: install
	$(BIN)/python bench/run.py
	$(BIN)/python bench/noop.py
	$(BIN)/python bench/sweep.py
	$(BIN)/python bench/compare.py
	$(BIN)/python bench/lora_bake.py
	$(BIN)/python bench/flux.py
	$(BIN)/python bench/remote.py --repeat 3
	$(BIN)/python bench/ray_sweep.py

clean:
	rm -rf $(VENV) $(DEMO) .pytest_cache
