# The two commands of the README: `make demo` and `make test`. Both set up what they need.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: setup test demo

setup:
	bash scripts/setup.sh

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

demo: setup
	$(PYTHON) scripts/demo.py
