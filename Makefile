# The two commands a newcomer runs:  make demo   and   make test
# Both create .venv from Debian's /usr/bin/python3 (readable by every account, unlike a
# pyenv build under /root) and install what they need themselves.

PYTHON_BASE ?= $(shell test -x /usr/bin/python3 && echo /usr/bin/python3 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=
# The suite runs on two pytest-xdist workers, each taking whole test files (module
# fixtures stay shared); PYTEST_WORKERS=0 runs it in this one process instead.
PYTEST_WORKERS ?= 2

.PHONY: all venv demo test lint typecheck imports docs unit bench mutation clean

all: test

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,parsl,docs]'
	rm -f $(VENV)/.installed-* && touch $@

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench conformance
	$(VENV)/bin/ruff format --check src tests bench conformance

typecheck: $(STAMP)
	$(VENV)/bin/mypy

imports: $(STAMP)
	$(VENV)/bin/lint-imports

# The documentation site and the library reference (mkdocs.yml): warnings are errors.
docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict --quiet --site-dir build/site

# Coverage includes the processes the tests start (mepd serve, user endpoints running as
# other accounts from tests/runtime_venv.py): they write their data into a per-run
# directory every account can write to (mode 1777, outside this possibly private
# checkout), which pytest-cov combines and reports; the result is kept as ./.coverage.
unit: $(STAMP)
	@data=$$(mktemp -d /tmp/mep-coverage-XXXXXX) && chmod 1777 "$$data" && \
	trap 'rm -rf "$$data"' EXIT && \
	status=0 && \
	COVERAGE_FILE="$$data/.coverage" $(VENV)/bin/pytest --cov --cov-report=term:skip-covered \
		-n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS) || status=$$?; \
	cp "$$data/.coverage" .coverage 2>/dev/null || true; \
	exit $$status

test: lint typecheck imports docs unit

demo: $(STAMP)
	$(PY) examples/demo/demo.py

bench: $(STAMP)
	$(PY) -m pip install -q -e '.[test,parsl,bench]'
	$(PY) bench/report.py --output docs/performance.md

# Mutation scores of the security-critical modules (docs/security.md), not part of `make
# test`. mutmut 3 (not cosmic-ray): it mutates this src/ layout as it is, in a copy
# (./mutants), forks every mutant from one warm pytest and runs only the tests that reach
# the mutated function (the modules, the tests and the equivalent mutants are configured in
# [tool.mutmut] and tools/mutation-equivalents.toml). Prints a score per module and fails
# below 0.9. MUTATION_JOBS bounds the parallel workers (the run is niced).
MUTATION_JOBS ?= 2

mutation: $(STAMP)
	$(PY) -m pip install -q -e '.[test,parsl,docs,mutation]'
	$(PY) tools/mutation.py --jobs $(MUTATION_JOBS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage mutants
