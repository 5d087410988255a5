# Two commands on a fresh machine: `make demo` and `make test`.
# torch is installed first by exact pin: on our machines it resolves to a local CPU wheel,
# while any looser spec downloads gigabytes of CUDA packages.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.quintet-installed

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(PY) -m quintet.demo

# The chat-page test runs in Debian's chromium: installed here when missing and apt-get can (root);
# otherwise that one test skips, saying why.
test: $(STAMP)
	@test -x /usr/bin/chromium || ! command -v apt-get >/dev/null || \
		(apt-get install -y -qq chromium >/dev/null 2>&1 || \
		 (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq chromium >/dev/null 2>&1)) || \
		echo "chromium could not be installed: the chat-page test will skip"
	$(PY) -m ruff check .
	$(PY) -m pytest

lint: $(STAMP)
	$(PY) -m ruff check .

clean:
	rm -rf runs .pytest_cache
