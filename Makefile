# Everything sets up its own .venv. torch: the CPU build from this machine's disk when no torch is
# importable; an already-installed (e.g. CUDA) torch is kept because the venv sees system packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	@echo "make demo: the train -> publish -> serve demo is coming with the trainer issue (#4)."
	@echo "Today it builds the tiny base model and runs the engine on it with one PEFT adapter."
	$(PY) -m server.demo_engine

bench: $(STAMP)
	$(PY) bench/engine_bench.py

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
