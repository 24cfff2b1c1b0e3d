# The two commands a new user needs: `make demo` and `make test`. Both create the virtualenv
# (.venv) and install the project into it on first use, or when pyproject.toml changes.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
EXTRAS ?= cpu,dev

.PHONY: demo test lint bench clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]'
	touch $@

demo: $(VENV)/.installed
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/facecaption demo

test: $(VENV)/.installed
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.installed
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: $(VENV)/.installed
	$(BIN)/python bench/bench_fetch.py --images 600 --write docs/benchmarks.md
	$(BIN)/python bench/bench_img2dataset.py --urls 5000 --write docs/benchmarks.md
	$(BIN)/python bench/bench_detect.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_detectors.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_attributes.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_caption.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_release.py --shards 200 --rows 3000 --write docs/benchmarks.md
	$(BIN)/python bench/bench_scale.py --write docs/benchmarks.md

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
