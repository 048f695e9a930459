# Two set-up commands for a fresh clone; each makes its own virtual environment (.venv) and installs what it needs.
#   make demo   runs the main job (the bench at 10 steps: digits-dit, fewer steps, FirstBlockCache, and ours side by side)
#   make test   installs the package with its test extras and runs the test suite
#   make app    serves the Gradio demo (app.py) on http://127.0.0.1:7860, offline, on the shipped models
#   make lint   checks the formatting and the lint rules of pyproject.toml (ruff)
#   make gpu-check   on a CUDA machine: the GPU measurements of docs/gpu.md into one JSON file (scripts/gpu-check.sh)
# CI also runs `make lint` and `make test-lower-bounds`: the same suite in .venv-lower-bounds, every dependency pinned
# to the lowest version pyproject.toml allows (.ci/lower-bounds.txt).
VENV ?= .venv
LOWER_VENV ?= .venv-lower-bounds
PYTHON ?= python3
BIN := $(VENV)/bin
LOWER_BIN := $(LOWER_VENV)/bin

.PHONY: demo app test test-slow test-lower-bounds lint gpu-check clean

$(BIN)/ee-diffusion: pyproject.toml
	@echo "Installing ee-diffusion and what it needs (torch, diffusers, transformers, gradio, ...) into $(VENV):"
	@echo "a few minutes the first time; later runs reuse it."
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

demo: $(BIN)/ee-diffusion
	@echo "ee-diffusion bench: 6 methods x 250 samples of digits-dit at 10 steps, then 5 timed rounds (about 2 minutes"
	@echo "on 2 idle CPU cores; several times longer when other work shares them)."
	$(BIN)/ee-diffusion bench

app: $(BIN)/ee-diffusion
	$(BIN)/python app.py

# The tests also cover the peers the bench compares against (cache-dit, DeepCache: the `peers` extra); they skip,
# saying so, where those are not installed (`make test-lower-bounds`).
$(VENV)/peers-installed: $(BIN)/ee-diffusion
	$(BIN)/python -m pip install -q -e ".[dev,peers]"
	touch $@

test: $(BIN)/ee-diffusion $(VENV)/peers-installed
	$(BIN)/python -m pytest -q

test-slow: $(BIN)/ee-diffusion
	$(BIN)/python -m pytest -q -m slow || [ $$? -eq 5 ]  # 5: no slow test collected yet

$(LOWER_BIN)/ee-diffusion: pyproject.toml .ci/lower-bounds.txt
	$(PYTHON) -m venv $(LOWER_VENV)
	$(LOWER_BIN)/python -m pip install -q --upgrade pip
	$(LOWER_BIN)/python -m pip install -q -e ".[dev]" -c .ci/lower-bounds.txt
	touch $@

test-lower-bounds: $(LOWER_BIN)/ee-diffusion
	$(LOWER_BIN)/python -m pytest -q

lint: $(BIN)/ee-diffusion
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

# GPU_CHECK_OUT: the JSON file it writes (an existing one is refused).
GPU_CHECK_OUT ?= out/gpu-check.json
gpu-check: $(BIN)/ee-diffusion
	PYTHON=$(BIN)/python bash scripts/gpu-check.sh $(GPU_CHECK_OUT)

clean:
	rm -rf $(VENV) $(LOWER_VENV)
