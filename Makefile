# The two commands of the README: `make demo` and `make test`. Both set up what they need.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: setup test demo bench test-image

setup:
	bash scripts/setup.sh

test: setup
	$(PYTHON) -m pytest -q -p no:cacheprovider $(PYTEST_ARGS)

# The container image built with podman on a local debootstrap base and run with the
# DaemonSet's security settings in a namespace (about 4 minutes from scratch; root).
test-image: setup
	bash tests/image/setup.sh
	OSSENSOR_TEST_IMAGE=1 $(PYTHON) -m pytest -q -p no:cacheprovider tests/image $(PYTEST_ARGS)

demo: setup
	$(PYTHON) scripts/demo.py

# What capture costs the node, against tcpdump in the same run, three rounds (about 13 minutes;
# root).
# BENCH_ARGS="--smoke" for a quick check, "--help" for the options.
BENCH_ARGS ?=
bench: setup
	$(PYTHON) -m bench.run $(BENCH_ARGS)
