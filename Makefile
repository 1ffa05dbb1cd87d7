# The two set-up commands are `make demo` and `make test`; both create .venv on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist workers: one per core, at most 4 (each worker trains the session's fixture checkpoints itself).
JOBS ?= $(shell $(PYTHON) -c "import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))" 2>/dev/null || echo 2)

.PHONY: demo test test-slow test-all lint bench clean fuzz

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first and pinned: the CPU wheel; an open range resolved first would pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	# The extras' own requirements admit other torch releases: torch stays pinned in the same resolve.
	$(PY) -m pip install -q -e '.[dev,executorch,openvino,litert]' torch==2.13.0
	touch $(STAMP)

demo: $(STAMP)
	$(PY) fixtures/make_checkpoints.py .demo classifier
	$(VENV)/bin/lexport .demo/classifier.ckpt --module fixtures.modules:MyClassifierModule --attr model \
		--to state-dict --to safetensors --to torchscript --to onnx --to exported-program --to openvino --to tflite \
		--output-dir .demo/out --force

# Every claim at least once, under 5 minutes on 2 cores. --dist loadscope: a test file runs on one worker, so its
# module fixtures (an export shared by its tests) are built once, not once per worker.
test: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist loadscope -m "not slow" $(PYTEST_ARGS)

# The rest: every compiled format (aoti, executorch, LiteRT) in the every-format checks, DeepSpeed and DDP runs.
test-slow: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist loadscope -m slow $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q -n $(JOBS) --dist loadscope $(PYTEST_ARGS)

# 5,000 generated checkpoint pickles (shared/self references, depth, declared sizes, globals); summary at the end.
fuzz: $(STAMP)
	LEXPORT_FUZZ_EXAMPLES=$${LEXPORT_FUZZ_EXAMPLES:-5000} $(PY) -m pytest -q tests/test_fuzz.py -k pickle_structures $(PYTEST_ARGS)
	# 300 bit flips and truncations per artifact format (.pte .tflite .onnx .xml/.bin .pt2 .aoti.pt2 TorchScript).
	LEXPORT_FUZZ_ARTIFACTS=$${LEXPORT_FUZZ_ARTIFACTS:-300} $(PY) -m pytest -q tests/test_artifacts_hostile.py -k fuzzed $(PYTEST_ARGS)

# ruff on everything; mypy on the package (configured in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check lightning_export tests fixtures benchmarks
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) benchmarks/run.py $(BENCH_ARGS)

clean:
	rm -rf .demo .pytest_cache benchmarks/results
