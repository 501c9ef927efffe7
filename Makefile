# Two commands on a fresh machine: `make run` (the main job) and `make test` (the tests).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

PEERS_STAMP := $(VENV)/.installed-peers

.PHONY: setup peers run test bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[peers,test,train]'
	touch $(STAMP)

# The reader's io_uring backend (reference/uring_reads.c) where cc and liburing-dev are installed; without them the
# reader keeps its threads (`flashbench reader-sweep` and the io_uring tests say so).
URING := reference/_uring_reads.so
$(URING): reference/uring_reads.c
	@cc -O2 -shared -fPIC -o $@ $< -luring 2>/dev/null && echo "built $@ (the io_uring reader)" || \
		echo "not built: $@ (needs cc and liburing-dev: apt-get install liburing-dev); the reader uses threads"

# The FFN's 16-bit products over the neuron cache's rows by index (reference/row_kernels.c); without a C compiler
# the engine gathers the rows and multiplies with torch (reference/row_kernels.py says why).
ROW_KERNELS := reference/_row_kernels.so
$(ROW_KERNELS): reference/row_kernels.c
	@cc -O3 -ffp-contract=off -fopenmp -shared -fPIC -o $@ $< 2>/dev/null && echo "built $@ (the FFN's products by index)" || \
		echo "not built: $@ (needs cc); the engine's 16-bit products use torch"

setup: $(STAMP) $(URING) $(ROW_KERNELS)

# The peers that are other projects (llama.cpp, AirLLM): optional, `make test` skips their tests without them.
# llama-cpp-python compiles llama.cpp for this CPU (its multimodal library left out: the peer decodes text).
$(PEERS_STAMP): $(STAMP)
	CMAKE_ARGS="-DLLAVA_BUILD=OFF" CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/python -m pip install -q -e '.[llama,airllm]'
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)

run: setup peers
	$(BIN)/flashbench run

# The whole suite on the machine's own kernels, one pytest worker per core with one torch thread each (a module's
# tests on one worker, as its fixtures are shared), then the exactness tests again on all threads and under every
# other CPU kernel path the machine offers (tests/kernel_paths.py), with how close each came to the exact tiers' bound.
EXACTNESS_LOG := $(VENV)/exactness-native.jsonl
test: setup
	rm -f $(EXACTNESS_LOG)
	FLASHBENCH_EXACTNESS_LOG=$(abspath $(EXACTNESS_LOG)) OMP_NUM_THREADS=1 $(BIN)/python -m pytest -q -n auto \
		--dist loadfile
	$(BIN)/python tests/kernel_paths.py --native-log $(EXACTNESS_LOG)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks

# Regression benchmarks (pytest-benchmark), saved under $(BENCH_STORAGE) and compared with the last saved run there:
# the run fails where a benchmark's median got more than $(BENCH_FAIL) slower. The first run is the baseline.
BENCH_STORAGE ?= .benchmarks
BENCH_FAIL ?= 25%
bench: setup
	@if ls $(BENCH_STORAGE)/*/[0-9][0-9][0-9][0-9]_*.json >/dev/null 2>&1; then \
		compare="--benchmark-compare --benchmark-compare-fail=median:$(BENCH_FAIL)"; \
	else echo "make bench: no saved run under $(BENCH_STORAGE): this run becomes the baseline"; compare=""; fi; \
	$(BIN)/python -m pytest suite/benchmarks --benchmark-only --benchmark-storage=file://$(BENCH_STORAGE) \
		--benchmark-autosave --benchmark-columns=min,median,mean,stddev,rounds --benchmark-sort=name $$compare
