# Two commands do everything on a fresh Debian machine as root:
#   make demo   set up, bring the local cluster up, run the example jobs end to end
#   make test   set up, then the whole test suite (unit + integration on the real cluster)
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS := train,serve,search,mpi,export,dashboard,llm,dev
PYTEST_ARGS ?=

.PHONY: setup system venv horovod vllm cluster demo test lint bench clean

setup: system venv horovod vllm cluster

# Debian packages: Slurm, munge, MariaDB, OpenMPI, hdf5-tools, shellcheck, build tools.
system:
	bash scripts/setup-system

venv: $(VENV)/.installed

# torch is pinned (CPU wheel) and installed first so nothing pulls a CUDA build.
$(VENV)/.installed: pyproject.toml | system
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip wheel setuptools
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[$(EXTRAS)]'
	touch $@

# Horovod 0.28.1 built against torch 2.13 (C++17 patch); the wheel is cached outside the repo.
horovod: venv
	bash scripts/build-horovod $(VENV)

# vLLM's CPU build in its own venv (.venv-vllm) for LLM services (site key serving.vllm.python).
vllm: | system
	bash scripts/setup-vllm .venv-vllm

cluster: | system
	bash scripts/dev-cluster up

demo: setup
	bash scripts/demo

# pytest exit 5 ("no tests ran") is a failure here, never a silent pass.
test: setup
	@set -a; eval "$$(scripts/dev-cluster env)"; set +a; \
	export PATH="$(CURDIR)/$(VENV)/bin:$$PATH" OMP_NUM_THREADS=1; \
	$(PY) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS) tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest ran no tests" >&2; exit 1; fi; exit $$rc

lint: venv
	$(VENV)/bin/ruff check aimass_hpc tests benchmarks examples
	$(VENV)/bin/ruff format --check aimass_hpc tests benchmarks examples
	$(VENV)/bin/lint-imports --no-cache
	$(VENV)/bin/mypy

bench: setup
	$(PY) benchmarks/bench_repo.py --size-mb 256
	$(PY) benchmarks/bench_train.py
	$(PY) benchmarks/bench_serve.py
	$(PY) benchmarks/hpo/run.py --quick
	$(PY) benchmarks/bench_search_state.py

clean:
	bash scripts/dev-cluster down || true
	rm -rf $(VENV)
