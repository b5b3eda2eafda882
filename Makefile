# Every target that runs Python creates .venv (and installs the suite into it) if it is missing.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
RUNS   ?= runs

.PHONY: help install demo test lint format bench clean

help: ## list the targets
	@grep -E '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-20s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP) ## create .venv and install the suite (done by every other target too)

demo: $(STAMP) ## main job: 4 methods x 3 seeds on scikit-learn digits (CPU), then results/demo/
	$(PY) -m alr.train -m experiment=demo paths.output_dir=$(RUNS)
	$(PY) -m alr.report demo --runs $(RUNS)/demo --out results/demo
	$(PY) scripts/sync_readme.py

test: $(STAMP) ## run the test suite on the CPU (no GPU, no download)
	$(PY) -m pytest -n 2 --durations=8

lint: $(STAMP) ## ruff lint and format check
	$(PY) -m ruff check src tests scripts bench
	$(PY) -m ruff format --check src tests scripts bench

format: $(STAMP) ## apply ruff's formatting and import order
	$(PY) -m ruff check --fix --select I src tests scripts bench
	$(PY) -m ruff format src tests scripts bench

bench: $(STAMP) ## speed benchmarks (bench/*.py, CPU: under 10 minutes) into results/bench.md and the README
	$(PY) bench/run_all.py --out results/bench.md
	$(PY) scripts/sync_readme.py

clean: ## remove run folders and caches (keeps .venv and results/)
	rm -rf $(RUNS) multirun outputs wandb .pytest_cache .ruff_cache
	find . -name __pycache__ -not -path './.venv/*' -prune -exec rm -rf {} +
