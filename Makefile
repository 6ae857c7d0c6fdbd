# Task runner. `make demo` and `make test` do all set-up on a fresh clone (a .venv with the project).
PY ?= python3
VENV ?= .venv
export ONEDNN_MAX_CPU_ISA ?= AVX512_CORE_BF16
export PYTHONHASHSEED ?= 0

.PHONY: setup demo test bench clean
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(VENV)/bin/python -m diagnose.demo --out outputs/demo

test: setup
	$(VENV)/bin/python -m pytest -q

bench: setup
	$(VENV)/bin/python -m capture.bench --out outputs/bench

clean:
	rm -rf outputs .pytest_cache
