# elbolab: `make demo` and `make test` each create .venv when needed.
# torch is pinned to a CPU build by default; on a CUDA machine choose another build, e.g.
#   make test TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin

.PHONY: demo test test-slow bench lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# Install torch first and on its own: with the pinned build present, pip resolves elbolab's
# `torch` requirement to it instead of pulling the newest build and its CUDA packages.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $@

demo: $(VENV)/.installed
	$(BIN)/elbolab fit --data digits --binarize dynamic --hidden 256 --z-dim 8 --epochs 100 --objective elbo --out runs/demo/elbo --overwrite
	$(BIN)/elbolab fit --data digits --binarize dynamic --hidden 256 --z-dim 8 --epochs 100 --objective elbo-analytic --out runs/demo/elbo-analytic --overwrite
	$(BIN)/elbolab evaluate runs/demo/elbo runs/demo/elbo-analytic --num-samples 5000
	$(BIN)/elbolab compare --data digits --binarize dynamic --hidden 256 --z-dim 8 --epochs 60 --objectives elbo,iwae:k=5,iwae-dreg:k=5,renyi:alpha=0.5:k=5 --seeds 0,1 --num-samples 1000 --out runs/demo/compare --overwrite

test: $(VENV)/.installed
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.installed
	$(BIN)/python -m pytest -q -m slow

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/iwae_step_cost.py

lint: $(VENV)/.installed
	$(BIN)/ruff check elbolab tests benchmarks examples

clean:
	rm -rf $(VENV) runs .pytest_cache
