# `make demo` and `make test` each do all the set-up on a fresh machine (a .venv in the clone).
# torch and torchvision must be one matched build, so pip resolves both from the package index;
# PIP_CONFIG_FILE=/dev/null keeps a machine-local torch wheel (find-links) out of the resolution.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP_ENV := PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS= PIP_DISABLE_PIP_VERSION_CHECK=1

.PHONY: demo test test-all lint install bench
install: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml constraints.txt
	python3 -m venv $(VENV)
	$(PIP_ENV) $(VENV)/bin/pip install -q -c constraints.txt -e '.[all,dev]'
	touch $@

demo: $(VENV)/.installed
	$(PY) -m mobileone demo

# The tests start with the lint: CI runs `make test`, so a change that ruff refuses does not land. It leaves
# out the tests marked slow (runtime converters, training subprocesses: about 4 minutes on 2 cores);
# `make test-all` runs them too.
test: lint
	$(PY) -m pytest -q -p no:cacheprovider --durations=15 -m "not slow"

test-all: lint
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check mobileone tests experiments && $(VENV)/bin/ruff format --check mobileone tests experiments

# The README's latency table: run on a quiet machine (about 10-15 minutes on 2 cores).
bench: $(VENV)/.installed
	$(PY) -m mobileone bench --threads 2 --out bench_results
