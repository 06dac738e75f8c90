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

.PHONY: install demo test bench wheels
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

# For a machine with no package index whose Python already holds torch and the common
# scientific packages (a GPU image): the DeepSpeed plugin's packages as wheels in .whl/, for
# CPython $(WHEEL_PY) on x86-64 Linux. There: pip install --no-index --no-deps --target DIR .whl/*.whl
# and PYTHONPATH=DIR (README, "On GPUs"). Versions are this venv's, so both sides run the same.
WHEEL_PY ?= 3.12
WHEEL_PACKAGES := hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
wheels: $(STAMP)
	rm -rf .whl
	$(PY) -m pip wheel --quiet --no-deps --no-build-isolation -w .whl deepspeed==$$($(PY) -m pip show deepspeed | sed -n 's/^Version: //p')
	$(PY) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(WHEEL_PY) --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
		$$(for p in $(WHEEL_PACKAGES); do echo "$$p==$$($(PY) -m pip show $$p | sed -n 's/^Version: //p')"; done)
	ls -l .whl
