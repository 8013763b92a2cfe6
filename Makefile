# Every target bootstraps .venv with the machine's python3 when it is missing and
# (re)installs the package only when setup.cfg changed: a fast no-op otherwise.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STUDY_WORKDIR ?= runs/default
STUDY_CONFIG ?= configs/default.py
PYTEST_ARGS ?=

.PHONY: study test bench clean-venv

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): setup.cfg | $(PY)
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

study: $(STAMP)
	$(PY) -m launch.study --config=$(STUDY_CONFIG) --workdir=$(STUDY_WORKDIR)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile tests $(PYTEST_ARGS)

# torch (a CPU build) runs the PyTorch peers of train_step and sampling; a no-op when there.
bench: $(STAMP)
	$(PY) -m pip install --quiet torch==2.13.0 -e '.[bench]'
	$(PY) -m bench.run_all

clean-venv:
	rm -rf $(VENV)
