# sdcli: `make install` once (the runtime only), then `make demo`; `make test` adds the test stack.
VENV ?= .venv
PY := $(VENV)/bin/python
TEST_STAMP := $(VENV)/.test-extras

.PHONY: install demo test lint

install:
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -e .

# the README's picture: a fixed seed, so every machine renders the same one
demo:
	$(VENV)/bin/sdcli generate "a red circle on a white background" --seed 1234 --out out/demo

# diffusers, transformers and friends are the oracle the tests compare with; installed once per pyproject change
$(TEST_STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -e '.[test]'
	touch $@

test: $(TEST_STAMP)
	$(VENV)/bin/pytest -q

# ruff when it is installed, else at least a syntax check of every file
lint:
	if $(PY) -m ruff --version >/dev/null 2>&1; then $(PY) -m ruff check sdcli tests bench; else $(PY) -m compileall -q sdcli tests; fi

# sdcli against diffusers side by side (docs/performance.md); bench-smoke checks the benchmark on a tiny model
# (BENCH_ARGS="--model sdxl" for SDXL's tiny model); bench-sdxl is the SDXL rows (about 20 minutes, 20 GiB free)
.PHONY: bench bench-smoke bench-sdxl
bench: $(TEST_STAMP)
	$(PY) bench/bench.py $(BENCH_ARGS)

bench-sdxl: $(TEST_STAMP)
	$(PY) bench/bench.py --model sdxl $(BENCH_ARGS)

bench-smoke: $(TEST_STAMP)
	$(PY) bench/bench.py --smoke $(BENCH_ARGS)
