# Every target does its own set-up, so `make test` and `make demo` work on a
# fresh clone with only Python 3.11+ installed.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: venv protos test lint bench clean jaeger demo

# Jaeger for the tracing tests, built from the Go module pinned in
# tools/jaeger; rebuilt only when that module's go.mod or go.sum changes.
JAEGER := tools/bin/jaeger

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

protos: venv
	$(BIN)/python -m protos.generate

lint: venv
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .
	$(BIN)/mypy

jaeger:
	@if command -v go >/dev/null 2>&1; then \
		$(MAKE) --no-print-directory $(JAEGER); \
	else \
		echo "go is not on PATH: Jaeger is not built and its tests will be skipped"; \
	fi

$(JAEGER): tools/jaeger/go.mod tools/jaeger/go.sum
	cd tools/jaeger && go build -buildvcs=false -o ../bin/jaeger github.com/jaegertracing/jaeger/cmd/jaeger

test: lint jaeger
	$(BIN)/pytest

bench: venv
	$(BIN)/python -m bench.eventlog
	$(BIN)/python -m bench.coordinator
	$(BIN)/python -m bench.exchange
	$(BIN)/python -m bench.failover
	$(BIN)/python -m bench.flights

# The flight-delays job on a local cluster, verified; pass options with
# DEMO_ARGS, e.g. make demo DEMO_ARGS="--rows 50000 --kill-worker-at 2".
demo: venv
	$(BIN)/jobledger demo $(DEMO_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
