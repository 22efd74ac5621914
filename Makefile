# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both create .venv/ in the checkout when it is missing and install tlp into it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tlp-installed
# torch/torchvision are pinned to the releases that lie on local disk here; newer
# ones are multi-GB downloads.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: demo test setup bench clean

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_PINS) -e ".[test,models,dask]"
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m tlp demo

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	mkdir -p benchmarks/results
	$(PY) benchmarks/extract.py --json benchmarks/results/extract.json
	$(PY) benchmarks/extract.py --photos large --json benchmarks/results/extract_large.json
	$(PY) benchmarks/sweep.py --rows 2000 --json benchmarks/results/sweep_rows.json
	$(PY) benchmarks/finetune.py --json benchmarks/results/finetune.json
	$(PY) benchmarks/assemble_memory.py --json benchmarks/results/assemble_memory.json
	$(PY) benchmarks/scale.py --json benchmarks/results/scale.json
	$(PY) benchmarks/startup.py --json benchmarks/results/startup.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
