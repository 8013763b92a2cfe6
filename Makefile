# Every target bootstraps .venv with the machine's python3 when it is missing and
# (re)installs only when setup.cfg or requirements.lock changed: a fast no-op otherwise.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
STUDY_WORKDIR ?= runs/default
STUDY_CONFIG ?= configs/default.py
PYTEST_ARGS ?=

.PHONY: study test bench lock clean-venv flower

LOCK := requirements.lock
# The `flower` extra's environment: requirements.lock plus flwr and what it pins.
FLOWER_LOCK := requirements-flower.lock
FLOWER_STAMP := $(VENV)/.flower
# The PyTorch peer of the parity tests and benchmarks (not in the lock; its needs are).
TORCH := 2.13.0

$(PY):
	$(PYTHON) -m venv $(VENV)

# Exactly the lock (pip and setuptools included), then collab itself without dependencies.
$(STAMP): setup.cfg $(LOCK) | $(PY)
	$(PY) -m pip install --quiet -r $(LOCK)
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)
	if [ -f $(FLOWER_STAMP) ]; then $(PY) -m pip install --quiet -r $(FLOWER_LOCK); fi

# Federated training across machines on Flower (collab/flower, launch/flower_*.py).
flower: $(FLOWER_STAMP)
$(FLOWER_STAMP): $(STAMP) $(FLOWER_LOCK)
	$(PY) -m pip install --quiet -r $(FLOWER_LOCK)
	touch $(FLOWER_STAMP)

study: $(STAMP)
	$(PY) -m launch.study --config=$(STUDY_CONFIG) --workdir=$(STUDY_WORKDIR)

# With the flower extra installed (make flower), its lock is the one to hold.
test: $(STAMP)
	$(PY) -m launch.check_env --lock=$(if $(wildcard $(FLOWER_STAMP)),$(FLOWER_LOCK),$(LOCK))
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder tests $(PYTEST_ARGS)

# torch (a CPU build) runs the PyTorch peers of train_step and sampling; a no-op when there.
bench: $(FLOWER_STAMP)
	$(PY) -m pip install --quiet -c $(FLOWER_LOCK) torch==$(TORCH) -e '.[bench]'
	$(PY) -m bench.run_all

# Refreshes the lock on purpose: a fresh venv resolves setup.cfg's ranges (and the test
# extra) anew; review the diff, then `make clean-venv test` installs it.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e '.[test]' torch==$(TORCH)
	{ echo "# Made by \`make lock\` on $$(date -u +%F) with $$(.lock-venv/bin/python -V) on $$(uname -sm)."; \
	  echo "# Exact versions of every package \`make\` installs, and of the dependencies of the"; \
	  echo "# PyTorch peer (torch==$(TORCH), installed by .ci/run and make bench with -c this file)."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable --exclude torch; } > $(LOCK).tmp
	.lock-venv/bin/python -m pip install --quiet -e '.[flower]'
	{ echo "# Made by \`make lock\` on $$(date -u +%F): $(LOCK) plus the flower extra (make flower)."; \
	  .lock-venv/bin/python -m pip freeze --all --exclude-editable --exclude torch; } > $(FLOWER_LOCK).tmp
	mv $(LOCK).tmp $(LOCK)
	mv $(FLOWER_LOCK).tmp $(FLOWER_LOCK)
	rm -rf .lock-venv

clean-venv:
	rm -rf $(VENV)
