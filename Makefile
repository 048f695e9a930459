# Two set-up commands for a fresh clone; each makes its own virtual environment (.venv) and installs what it needs.
#   make demo   runs the main job (the bench: digits-dit, its shipped ASE schedule and digits-dit-ase, side by side)
#   make test   installs the package with its test extras and runs the test suite
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: demo test test-slow clean

$(BIN)/ee-diffusion: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: $(BIN)/ee-diffusion
	$(BIN)/ee-diffusion bench

test: $(BIN)/ee-diffusion
	$(BIN)/python -m pytest -q

test-slow: $(BIN)/ee-diffusion
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]  # 5: no slow test collected yet

clean:
	rm -rf $(VENV)
