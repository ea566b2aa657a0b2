# Two entry points for newcomers; each does all its own set-up.
#   make quickstart  - install, then train the quickstart job
#   make test        - install, then run the test suite
# and for CI: make test-docs - run every command of README.md and docs/ (docs/contributing.md)
# the second tier: make test-e2e - the long end-to-end tests `make test` leaves out
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

.PHONY: install install-test quickstart test test-e2e test-docs dataset browser bench-smoke

$(VENV)/.installed: pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: on a machine with torch wheels on disk, pip takes them from there
	$(PIP) install -q "torch==2.14.1" "torchvision==0.29.1" || $(PIP) install -q torch torchvision
	# a stale raygen.egg-info in the checkout shadows the installed metadata (entry points) for
	# anything run from here: let the install write a fresh one
	rm -rf raygen.egg-info
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

dataset:
	@test -d /usr/share/datasets/fashion-mnist || \
	  (command -v apt-get >/dev/null && (apt-get install -y -q dataset-fashion-mnist >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q dataset-fashion-mnist >/dev/null))) || \
	  echo "note: could not install dataset-fashion-mnist; install it with: sudo apt-get install dataset-fashion-mnist"

# Debian's Chromium for the playground's browser test (tests/test_serving_playground.py skips, naming
# this target, where it is missing); playwright drives it as is, no browser download.
browser:
	@command -v chromium >/dev/null || \
	  (command -v apt-get >/dev/null && (apt-get install -y -q chromium >/dev/null 2>&1 || \
	   (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null))) || \
	  echo "note: could not install chromium; the playground's browser test will be skipped (sudo apt-get install chromium)"

quickstart: install dataset
	$(VENV)/bin/raygen train jobs/specs/quickstart.yaml

# Tests that start Ray or a server run in a loopback-only network namespace
# (Ray otherwise binds the machine's own address). Without unshare rights the
# suite runs as is.
# The long end-to-end runs (marker e2e: multi-node, node kill, full sweeps, S3 round trips) are
# left to `make test-e2e`, which keeps this suite within its 25-minute budget on 2 cores.
test: install dataset browser
	@if unshare -n true 2>/dev/null; then \
	  unshare -n bash -c 'ip link set lo up && $(PY) -m pytest -p no:cacheprovider -m "not e2e" $(PYTEST_ARGS)'; \
	else \
	  $(PY) -m pytest -p no:cacheprovider -m "not e2e" $(PYTEST_ARGS); \
	fi

# The second tier: the end-to-end tests `make test` leaves out (tens of minutes on 2 cores).
test-e2e: install dataset
	@if unshare -n true 2>/dev/null; then \
	  unshare -n bash -c 'ip link set lo up && $(PY) -m pytest -p no:cacheprovider -m e2e $(PYTEST_ARGS)'; \
	else \
	  $(PY) -m pytest -p no:cacheprovider -m e2e $(PYTEST_ARGS); \
	fi

# The executable docs (tests/docs, left out of `make test`): minutes, in the same namespace.
test-docs: install dataset
	@if unshare -n true 2>/dev/null; then \
	  unshare -n bash -c 'ip link set lo up && $(PY) -m pytest -p no:cacheprovider tests/docs $(PYTEST_ARGS)'; \
	else \
	  $(PY) -m pytest -p no:cacheprovider tests/docs $(PYTEST_ARGS); \
	fi

# Every benchmark in its tiny --smoke mode (bench/run_smoke.sh), so none can rot unnoticed.
bench-smoke: install
	@if unshare -n true 2>/dev/null; then \
	  unshare -n bash -c 'ip link set lo up && PY=$(PY) bench/run_smoke.sh'; \
	else \
	  PY=$(PY) bench/run_smoke.sh; \
	fi
