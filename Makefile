# Two commands on a fresh machine with only Python: `make demo` (the main job), `make test`.
# Both create .venv on first use. GPU set-ups: `make CONSTRAINTS= ...` to let pip pick torch.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?= constraints-cpu.txt
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

$(STAMP): setup.py $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev,mpi,deepspeed]'
	touch $@

.PHONY: install demo test bench
install: $(STAMP)

# The main job: 2-process training quickstart, a fresh run dir each time (nothing overwritten).
demo: $(STAMP)
	$(PY) -m dist_soup train --config configs/quickstart.yaml --nproc 2 --run-dir runs/quickstart-$$(date +%Y%m%d-%H%M%S)

# Lint and types first (config in pyproject.toml): seconds, and they fail before 13 minutes of tests do.
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m mypy
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/compress_throughput.py
	$(PY) benchmarks/moo_overhead.py
	$(PY) benchmarks/collectives.py
