# Bootstrap and everyday commands. `make test` is what CI runs.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch by default; override for a CUDA build, e.g. `make test TORCH_SPEC="torch==2.13.0"`
# with your own index, or `TORCH_SPEC=` to keep the torch you already have in the venv.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: install train test lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install --quiet $(TORCH_SPEC))
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The default fine-tuning job: builds the tiny base model on first use, then fine-tunes it with GRASS.
train: install
	$(BIN)/grass-train $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info outputs multirun
