# The two commands a new user needs: `make demo` and `make test`. Both create the virtualenv
# (.venv) and install the project into it on first use, or when pyproject.toml or
# constraints.txt changes: every extra the tests need, at the versions in constraints.txt.
PYTHON      ?= python3
VENV        ?= .venv
BIN         := $(VENV)/bin
EXTRAS      ?= airflow,celery,cpu,llm,dev
CONSTRAINTS ?= constraints.txt

.PHONY: demo test lint bench constraints clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip
	$(BIN)/pip install --quiet -e '.[$(EXTRAS)]' -c $(CONSTRAINTS)
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
	$(BIN)/python bench/bench_task_cost.py --write docs/benchmarks.md
	$(BIN)/python bench/bench_scale.py --write docs/benchmarks.md

# constraints.txt from what the virtualenv has now (after upgrading something and running
# `make test`): every installed distribution but facecaption itself, with no local version
# label (torch's `+cpu`: the pin then takes 2.13.0 from either PyTorch's CPU index or PyPI).
constraints: $(VENV)/.installed
	{ echo "# Versions the test suite passed with: \`make constraints\` writes this file from the"; \
	  echo "# virtualenv. Install with: pip install 'facecaption[EXTRAS]' -c constraints.txt"; \
	  $(BIN)/python -c 'import platform as p; print("# on Python", p.python_version(), p.system(), p.machine())'; \
	  $(BIN)/pip freeze --exclude-editable --exclude facecaption | sed -E 's/^([^=]+==[^+]+)\+.*$$/\1/'; \
	} > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	touch $(VENV)/.installed  # the virtualenv is what the new file says: no reinstall

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
