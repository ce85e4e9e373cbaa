# llm-cost-exporter: the two commands a new user needs are `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CONFIG ?= examples/config.yaml
LISTEN ?=
STAMP := $(VENV)/.installed

.PHONY: run test lint unit e2e bench stack check-config clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

## run: install into .venv and serve the example config (SQLite ledger under examples/data/)
##      make run CONFIG=my.yaml LISTEN=127.0.0.1:9500
run: $(STAMP)
	$(BIN)/llm-cost-exporter serve --config $(CONFIG) $(if $(LISTEN),--listen $(LISTEN))

## test: lint, then the whole suite (unit + end-to-end with real Prometheus binaries)
test: $(STAMP) lint
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check exporter tests bench

unit: $(STAMP)
	$(BIN)/python -m pytest tests/unit

e2e: $(STAMP)
	$(BIN)/python -m pytest tests/e2e

check-config: $(STAMP)
	$(BIN)/llm-cost-exporter check-config --config $(CONFIG)

## bench: every benchmark (ratios against floors measured in the same run; ~10 min)
bench: $(STAMP)
	$(BIN)/python bench/proxy_overhead.py
	$(BIN)/python bench/ingest_throughput.py
	$(BIN)/python bench/scrape_time.py
	$(BIN)/python bench/startup.py

## stack: exporter + Prometheus + Alertmanager on loopback, without Docker
stack: $(STAMP)
	bash scripts/stack.sh

clean:
	rm -rf $(VENV) examples/data .pytest_cache .ruff_cache
