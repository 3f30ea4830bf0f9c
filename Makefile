# The two commands of the README: `make demo` and `make test`. Both set up what they need.
PYTHON ?= python3
PYTEST_ARGS ?=

.PHONY: setup test demo cluster-demo bench soak test-image

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

# The vSensor in cluster mode: two replicas behind HAProxy, three NATS servers, a store worker,
# a replica killed during the traffic (docs/cluster.md; root).
cluster-demo: setup
	$(PYTHON) scripts/cluster_demo.py

# What capture costs the node, against tcpdump -w FILE and tcpdump | socat over TLS in the same run,
# three rounds, routed trials through the simulated cluster included (about 20 minutes: one round
# took 400 s; root).
# BENCH_ARGS="--smoke" for a quick check, "--help" for the options.
BENCH_ARGS ?=
bench: setup
	$(PYTHON) -m bench.run $(BENCH_ARGS)

# Months on a node in an hour: the DaemonSet's sensor under steady traffic while pods come and go,
# the vSensor restarts and Antigena actions expire; memory, descriptors and threads of the sensor
# and the vSensor, slopes after the warm-up, a table and a plot (docs/soak.md; root).
# make soak MINUTES=120; SOAK_ARGS="--help" for the options.
MINUTES ?= 60
SOAK_ARGS ?=
soak: setup
	$(PYTHON) -m bench.soak --minutes $(MINUTES) $(SOAK_ARGS)
