# Two commands do all set-up on a fresh clone:
#   make train   create .venv if needed, then run the default training job
#   make test    create .venv if needed, then run the whole test suite
# The venv is rebuilt only when pyproject.toml changes (a stamp file tracks it).

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.raymoe-installed

.PHONY: setup train test clean-runs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch first and pinned: a CPU wheel where one is provided, never a surprise newer build.
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev,deploy]'
	touch $(STAMP)

setup: $(STAMP)

train: setup
	$(PY) -m jobs.train $(ARGS)

# Two pytest workers on the two cores: the Ray tests all go to one of them (one Ray cluster per run),
# the rest spread over both (tests/conftest.py assigns the groups).
test: setup
	$(PY) -m pytest -n 2 --dist loadgroup $(PYTEST_ARGS)

clean-runs:
	rm -rf runs
