# The two commands a new user needs: `make embed` and `make test`.
# Each sets up .venv on first use (torch pinned to the CPU build, so nothing pulls CUDA).

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed-stamp

SCHEDULER_HOST ?= 127.0.0.1
SCHEDULER_PORT ?= 8082
# The sample is split into shards of 25 documents so an interrupted `make embed`
# visibly resumes; real corpora use luigi.cfg's 1000.
EMBED_ARGS ?= --output output/sample --docs-per-shard 25
LUIGI_STATE := var/luigi

.PHONY: embed worker test check chaos verify report bench image cost-estimate luigid luigid-stop setup clean

setup: $(STAMP)

# torch through pip, which reads the machine's pip configuration (where a CPU wheel may
# lie on disk); the rest through uv, which downloads and installs in parallel (a fresh
# setup took 2:09 with pip alone, 1:10 this way), else through pip where uv fails.
# Bytecode is compiled at install, in parallel: where PYTHONDONTWRITEBYTECODE is set
# nothing is ever cached later, and every process would compile torch's modules (and
# sympy's, typing_extensions...) again.
# Like pip, the compile step lets pass the few files torch ships for newer Pythons.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --no-compile torch==$(TORCH_VERSION) uv
	$(BIN)/python -m compileall -q -j 0 "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')" >/dev/null || true
	$(BIN)/uv pip install --python $(BIN)/python --quiet --compile-bytecode -e '.[dev]' \
		|| $(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# Uses the central scheduler when `make luigid` runs one, else a local scheduler.
embed: $(STAMP)
	@if $(BIN)/python -c "import socket; socket.create_connection(('$(SCHEDULER_HOST)', $(SCHEDULER_PORT)), 1)" 2>/dev/null; then \
		echo "using the central scheduler at http://$(SCHEDULER_HOST):$(SCHEDULER_PORT)"; \
		$(BIN)/luigi --module pipeline EmbedAll --scheduler-host $(SCHEDULER_HOST) --scheduler-port $(SCHEDULER_PORT) $(EMBED_ARGS); \
	else \
		$(BIN)/luigi --module pipeline EmbedAll --local-scheduler $(EMBED_ARGS); \
	fi

# One of several workers sharing a run on one luigid (README, "Several workers"):
# make worker SCHEDULER_HOST=host EMBED_ARGS="--corpus gs://… --output gs://…"
# It waits for shards given back by a lost worker, and exits 0 when what it did went
# well even though other workers ran the rest (luigi's exit codes 10 and 25).
WORKER_FLAGS = --worker-keep-alive --no-lock --retcode-already-running 0 --retcode-not-run 0
worker: $(STAMP)
	$(BIN)/luigi --module pipeline EmbedAll --scheduler-host $(SCHEDULER_HOST) --scheduler-port $(SCHEDULER_PORT) \
		$(WORKER_FLAGS) $(EMBED_ARGS)

# Tests run on three worker processes (pytest-xdist): many wait on servers, subprocesses
# and clocks rather than a core, and the container tests (one group, sent first) mostly
# wait on the image build, so three keep two cores busy. TEST_WORKERS=0: one process.
# The fast tier has no container tests and is CPU-bound: two workers there (3:04 against
# 3:43 on three and 4:49 on one, the same afternoon).
TEST_WORKERS ?= 3
CHECK_WORKERS ?= 2
parallel = $(if $(filter 0,$(1)),,-n $(1) --dist loadgroup)

# The project's own modules are compiled first: where PYTHONDONTWRITEBYTECODE is set,
# each of the suite's few hundred processes would compile them again (about 0.25 s each).
compile = $(BIN)/python -m compileall -q pipeline tests >/dev/null

# The whole suite: what CI runs (.ci/run).
test: $(STAMP)
	$(compile)
	$(BIN)/python -m pytest $(call parallel,$(TEST_WORKERS)) $(PYTEST_ARGS)

# The fast tier for daily work: everything but the tests that run the pipeline or the
# model in subprocesses, load thousands of objects into a storage server, or build
# images (markers slow and docker); a few minutes.
check: $(STAMP)
	$(compile)
	$(BIN)/python -m pytest -m "not slow and not docker" $(call parallel,$(CHECK_WORKERS)) $(PYTEST_ARGS)

# Fault injection, longer than make test's quick form: workers killed (SIGKILL) 25 times
# at random moments and mid-upload, rerun each time (tests/test_chaos.py).
CHAOS_KILLS ?= 25
chaos: $(STAMP)
	CHAOS_KILLS=$(CHAOS_KILLS) $(BIN)/python -m pytest tests/test_chaos.py $(PYTEST_ARGS)

# Prove an output is whole before importing it (exit 1, one line per problem, if not):
# make verify OUTPUT=gs://bucket/prefix
OUTPUT ?= output/sample
verify: $(STAMP)
	$(BIN)/python -m pipeline verify $(OUTPUT)

# A page and a PNG of how a run went (docs/report.md): make report OUTPUT=gs://bucket/prefix
report: $(STAMP)
	$(BIN)/python -m pipeline report $(OUTPUT)

# Benchmarks print figures side by side in one run; they are never timed tests.
# Throughput (docs/performance.md): make bench CORPUS=dir BENCH_ARGS="--json bench.json"
bench: $(STAMP)
	$(BIN)/python -m pipeline bench $(if $(CORPUS),--corpus $(CORPUS)) $(BENCH_ARGS)
	$(BIN)/python tests/benchmarks/shard_memory.py
	$(BIN)/python tests/benchmarks/manifest_memory.py
	$(BIN)/python tests/benchmarks/verify_memory.py
	$(BIN)/python tests/benchmarks/sync_cost.py
	$(BIN)/python tests/benchmarks/storage_choices.py
	$(BIN)/python tests/benchmarks/scale.py

# Build the pod's image and push it to PIPELINE_REGISTRY (.env), tagged with the git
# revision; needs a Docker engine. Prints the reference to pass as --image.
image: $(STAMP)
	$(BIN)/python -m pipeline image

# What a corpus will cost on Runpod before any pod starts: make cost-estimate CORPUS=gs://b/p
cost-estimate: $(STAMP)
	$(BIN)/python -m pipeline estimate $(if $(CORPUS),--corpus $(CORPUS))

# Central scheduler with its web view at http://127.0.0.1:8082; state and task
# history (sqlite) under var/luigi. Stop it with `make luigid-stop`.
luigid: $(STAMP)
	mkdir -p $(LUIGI_STATE)/log
	$(BIN)/luigid --background --address $(SCHEDULER_HOST) --port $(SCHEDULER_PORT) \
		--pidfile $(LUIGI_STATE)/luigid.pid --logdir $(LUIGI_STATE)/log --state-path $(LUIGI_STATE)/state.pickle
	@echo "luigid on http://$(SCHEDULER_HOST):$(SCHEDULER_PORT) (pid $$(cat $(LUIGI_STATE)/luigid.pid))"

# Waits until luigid has saved its state and exited.
luigid-stop:
	@if [ -f $(LUIGI_STATE)/luigid.pid ]; then \
		pid=$$(cat $(LUIGI_STATE)/luigid.pid); kill $$pid 2>/dev/null; \
		while kill -0 $$pid 2>/dev/null; do sleep 0.2; done; \
		rm -f $(LUIGI_STATE)/luigid.pid; echo "luigid (pid $$pid) stopped"; \
	fi

# var/luigi itself stays: it ships with the repository so that luigid started by hand
# from here finds the folder luigi.cfg keeps its state and task history in.
clean:
	rm -rf output .pytest_cache $(LUIGI_STATE)/*
