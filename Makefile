# Two targets a newcomer needs: `make ioi` (the main job, offline) and `make test`. Both install into .venv first.
VENV := .venv
PY := $(VENV)/bin/python
JOBS ?= 1

$(VENV)/.installed: pyproject.toml
	@echo "First run: creating $(VENV) and installing torch 2.13.0 (CPU build, about 750 MB installed), then hookvene with"
	@echo "transformers, safetensors, jaxtyping, tqdm, matplotlib and the test tools (pytest, ruff, beartype, hypothesis)."
	@echo "This takes a minute or two; later runs skip it."
	python3.11 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0   # the CPU wheel; an unpinned torch pulls a multi-GB CUDA build
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed

ioi: install
	$(VENV)/bin/hookvene ioi --out out/

test: install
	$(PY) -m pytest

test-fast: install   # all but the end-to-end runs (CLI, examples, README blocks), on two processes, bytecode cached
	PYTHONDONTWRITEBYTECODE= $(PY) -m pytest -n 2 --dist loadfile -m "not slow and not subprocess and not e2e"

test-shapes: install   # the core tests with every jaxtyping shape annotation checked at run time
	$(PY) -m pytest --jaxtyping-packages=hookvene,beartype.beartype -k "not bad_input and not bad_inputs and not hand_made" \
	    tests/test_gpt2.py tests/test_gpt_neo.py tests/test_t5.py tests/test_gru.py tests/test_intervenable.py \
	    tests/test_generate.py tests/test_experiments.py tests/test_components.py tests/test_llama.py tests/test_gpt_neox.py \
	    tests/test_lens.py tests/test_induction.py

lint: install
	$(VENV)/bin/ruff check hookvene tests examples benchmarks scripts

mutants: install   # mutation testing of the core modules (mutmut, one copy of the tree per group under /tmp; long, not in CI) -> mutation/REPORT.md
	$(PY) mutation/run_mutants.py --jobs $(JOBS) $(GROUPS)   # e.g. make mutants GROUPS="loading interventions" JOBS=2

bench: install
	$(PY) benchmarks/bench_forward.py
	$(PY) benchmarks/bench_interventions.py
	$(PY) benchmarks/bench_generate.py
	$(PY) benchmarks/bench_experiments.py
	$(PY) benchmarks/bench_distributed.py
	$(PY) benchmarks/bench_collect.py --threads 1
	$(PY) benchmarks/bench_loading.py

.PHONY: install ioi test test-fast test-shapes lint bench mutants
