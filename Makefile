# Two commands on a fresh machine:
#   make start   set everything up, run the whole stack in the foreground
#   make test    set everything up, run the whole test suite
# Each step is skipped when its result is already there, so a second run takes seconds.

VENV    := .venv
STAMP   := $(VENV)/.meshvisor-installed
CONSUL  := .tools/consul/usr/bin/consul

.PHONY: setup start test bench clean-state consul postgres

setup: $(STAMP) consul postgres

$(STAMP): requirements.lock pyproject.toml scripts/setup-venv.sh
	@scripts/setup-venv.sh
	@touch $@

consul:
	@scripts/install-consul.sh

postgres:
	@scripts/install-postgres.sh

start: setup
	@$(VENV)/bin/supervisor start

test: setup
	@$(VENV)/bin/python -m pytest $(PYTEST_ARGS)

clean-state:
	rm -rf .state
