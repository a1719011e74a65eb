# asmlp_min — the single entry point. `make demo` and `make test` work on a fresh clone:
# they create .venv and install the package with its dev extras first (skipped when up to date).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
NBVAL  := --nbval --nbval-current-env --nbval-sanitize-with nbval.cfg
# JOBS pytest processes, each test module or notebook whole in one of them (loadscope), one torch thread each:
# the tests are mostly small tensors and Python, which a second thread barely speeds up and a second process does.
# One torch thread also keeps the two processes from spinning against each other. `make test JOBS=8` on 8 cores.
JOBS   ?= 2
PYTEST := OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n $(JOBS) --dist loadscope

.PHONY: venv install test test-unit test-notebooks demo lab notebooks bench lint clean

venv install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -c 'import sys; sys.exit(sys.version_info < (3, 10) and "asmlp_min needs Python 3.10 or newer, \
	and .venv has Python " + sys.version.split()[0] + ": remove .venv and run make again with PYTHON=python3.12 \
	(or another python3.1x)")'
	$(BIN)/python -m pip install --upgrade --quiet pip
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	$(BIN)/python -m ipykernel install --sys-prefix --name asmlp_min --display-name "Python (asmlp_min)" >/dev/null
	touch $(STAMP)

test: $(STAMP)  ## unit tests + notebooks under nbval, one pytest run
	$(PYTEST) $(NBVAL) notebooks tests

test-unit: $(STAMP)
	$(PYTEST) tests

test-notebooks: $(STAMP)
	$(PYTEST) $(NBVAL) notebooks

demo: $(STAMP)  ## train a small classifier, detector and segmenter on synthetic shapes; writes runs/demo/
	$(BIN)/asmlp-min demo

lab: $(STAMP)
	$(BIN)/jupyter lab notebooks/

notebooks: $(STAMP)  ## re-execute and store every notebook (outputs are never edited by hand)
	for nb in notebooks/*.ipynb; do \
	  $(BIN)/jupyter nbconvert --to notebook --execute --inplace --ExecutePreprocessor.kernel_name=asmlp_min \
	    --ExecutePreprocessor.timeout=1200 --ExecutePreprocessor.record_timing=False "$$nb" || exit 1; done

bench: $(STAMP)
	$(BIN)/asmlp-min bench --quick

lint: $(STAMP)
	$(BIN)/python -m compileall -q asmlp_min tests

clean:
	rm -rf $(VENV) runs .pytest_cache
