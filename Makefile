# The two set-up commands. Each creates or updates .venv/ and installs what it needs first.
#   make demo   run the main job end to end on embedded defaults
#   make test   lint, then the whole test suite
# CUDA users: pick your torch build, e.g.
#   make demo TORCH_SPEC="torch torchvision --index-url https://download.pytorch.org/whl/cu124"

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP := $(VENV)/.medfm-installed
DEMO_OUT ?= demo-out
# Test processes: a file's tests stay in one (its module fixtures: a Ray runtime, a server).
# Two fill CI's two cores; more would start that many Ray runtimes at once.
TEST_WORKERS ?= 2

.PHONY: demo test venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medfm demo --out $(DEMO_OUT)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile
