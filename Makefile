# Two commands on a fresh machine:
#   make start   set everything up, run the whole stack in the foreground
#   make test    set everything up, run the whole test suite
# Each step is skipped when its result is already there, so a second run takes seconds.

VENV    := .venv
STAMP   := $(VENV)/.meshvisor-installed
CONSUL  := .tools/consul/usr/bin/consul

.PHONY: setup start test cluster-demo bench bench-relay bench-sidecar bench-gateway bench-hosts bench-scale clean-state consul postgres prometheus wrk proxies

setup: $(STAMP) consul postgres prometheus

$(STAMP): requirements.lock pyproject.toml scripts/setup-venv.sh
	@scripts/setup-venv.sh
	@touch $@

consul:
	@scripts/install-consul.sh

postgres:
	@scripts/install-postgres.sh

prometheus:
	@scripts/install-prometheus.sh

start: setup
	@$(VENV)/bin/supervisor start

test: setup
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# Three hosts (network namespaces, root only) in one cluster, for a user to try; Ctrl-C stops them.
cluster-demo: setup
	@$(VENV)/bin/python scripts/cluster_demo.py

wrk:
	@command -v wrk >/dev/null 2>&1 || { echo "meshvisor: installing wrk with apt" >&2; \
	  DEBIAN_FRONTEND=noninteractive apt-get -qq update && DEBIAN_FRONTEND=noninteractive apt-get -qq install -y wrk >/dev/null; }

# The relay's own Python per request, feature by feature (no sockets; see bench/relay.py).
bench-relay: setup
	@$(VENV)/bin/python -m bench.relay $(BENCH_ARGS)

bench-sidecar: setup wrk
	@$(VENV)/bin/python -m bench.sidecar $(BENCH_ARGS)

# A cross-host hop against a same-host hop: two hosts in network namespaces (root).
bench-hosts: setup wrk
	@$(VENV)/bin/python -m bench.hosts $(BENCH_ARGS)

# Cost per instance and scale: 10, 50 and 100 instances under the supervisor (see bench/scale.py).
bench-scale: setup
	@$(VENV)/bin/python -m bench.scale $(BENCH_ARGS)

proxies: wrk
	@command -v nginx >/dev/null 2>&1 && command -v haproxy >/dev/null 2>&1 || { echo "meshvisor: installing nginx and HAProxy with apt" >&2; \
	  DEBIAN_FRONTEND=noninteractive apt-get -qq install -y nginx-light haproxy >/dev/null; }
	@[ -d bench/node-proxy/node_modules ] || (cd bench/node-proxy && npm ci --no-audit --no-fund --silent)

bench-gateway: setup proxies
	@$(VENV)/bin/python -m bench.gateway $(BENCH_ARGS)

# The benchmark report (bench/README.md): the whole stack under the supervisor, every path, one table.
bench: setup proxies
	@$(VENV)/bin/python -m bench.report $(BENCH_ARGS)

clean-state:
	rm -rf .state
