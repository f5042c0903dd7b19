# sdcli: `make install` once, then `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: install demo test lint

install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -e '.[test]'

demo:
	$(VENV)/bin/sdcli generate "a red circle on a white background" --out out/demo

test:
	$(VENV)/bin/pytest -q

# ruff when it is installed, else at least a syntax check of every file
lint:
	if $(PY) -m ruff --version >/dev/null 2>&1; then $(PY) -m ruff check sdcli tests; else $(PY) -m compileall -q sdcli tests; fi

# sdcli against diffusers side by side (docs/performance.md); bench-smoke checks the benchmark on a tiny model
.PHONY: bench bench-smoke
bench:
	$(PY) bench/bench.py $(BENCH_ARGS)

bench-smoke:
	$(PY) bench/bench.py --smoke $(BENCH_ARGS)
