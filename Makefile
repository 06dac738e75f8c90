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
	$(PY) -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e '.[dev,mpi]'
	touch $@

.PHONY: install demo test bench
install: $(STAMP)

demo: $(STAMP)
	$(PY) benchmarks/compress_throughput.py

test: $(STAMP)
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) benchmarks/compress_throughput.py
