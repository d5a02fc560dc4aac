# ai_stack backup: `make demo` runs a backup and restore on throwaway volumes,
# `make test` runs the tests. Both first install and start what they need.
PYTHON ?= python3
PYENV_ROOT ?= $(shell pyenv root 2>/dev/null)
# The oldest and newest supported interpreters, where pyenv has them.
OTHER_PYTHONS ?= $(foreach version,3.8 3.13,$(firstword $(wildcard $(PYENV_ROOT)/versions/$(version).*/bin/python3)))
PYTEST ?= -m pytest -q -rs -p no:cacheprovider

CHECKOUT := $(abspath .)
SERVICE_USER ?= $(shell stat -c %U $(CHECKOUT))
SERVICE_GROUP ?= $(shell id -gn $(SERVICE_USER))
UNIT_DIR ?= /etc/systemd/system
BACKUP_DIR ?= /srv/ai-stack/backups

.PHONY: prepare demo test bench bench-peers install-systemd lint

prepare:
	@PYTHONS="$(PYTHON) $(OTHER_PYTHONS)" sh dev/prepare-machine.sh

demo: prepare
	$(PYTHON) dev/demo.py

# Everything on python3; the tests that need no engine, plus one engine round
# trip, on the oldest and newest interpreters too. Where an engine answers, a skipped
# engine test fails the run (AI_STACK_REQUIRE_DOCKER=1), as in CI.
test: prepare
	AI_STACK_REQUIRE_DOCKER=$${AI_STACK_REQUIRE_DOCKER:-$$(docker info >/dev/null 2>&1 && echo 1 || echo 0)} \
		$(PYTHON) $(PYTEST) tests
	@for python in $(OTHER_PYTHONS); do \
		echo "== $$python"; \
		$$python $(PYTEST) -m "not engine or compat" tests || exit 1; \
	done

bench: prepare
	@PYTHONS="$(PYTHON) $(OTHER_PYTHONS)" sh dev/prepare-machine.sh bench
	$(PYTHON) bench/bench.py
	$(PYTHON) bench/peers.py

# The peers part alone: ours against restic and borg, nightly, hourly and on 200,000 small
# files (about ten minutes).
bench-peers: prepare
	@PYTHONS="$(PYTHON) $(OTHER_PYTHONS)" sh dev/prepare-machine.sh bench
	$(PYTHON) bench/peers.py

# Renders the unit templates for this checkout (paths, user, backup folder) and installs them.
RENDER = sed -e 's\#/home/wasti/ai_stack/\#$(CHECKOUT)/\#g' \
	    -e 's\#^User=wasti$$\#User=$(SERVICE_USER)\#' \
	    -e 's\#^Group=wasti$$\#Group=$(SERVICE_GROUP)\#' \
	    -e 's\#-o wasti -g wasti\#-o $(SERVICE_USER) -g $(SERVICE_GROUP)\#' \
	    -e 's\#/srv/ai-stack/backups\#$(BACKUP_DIR)\#g' \
	    -e 's\#^\\\# Template for .*\#\\\# Rendered by make install-systemd for $(CHECKOUT).\#'

# METRICS_DIR (node_exporter's textfile folder) and NETWORK_ALLOW (addresses the pings may
# reach) render a monitoring drop-in; without them any earlier one is removed.
METRICS_DIR ?=
NETWORK_ALLOW ?=

install-systemd:
	install -d $(DESTDIR)$(UNIT_DIR)
	for unit in ai_stack_backup.service ai_stack_backup-failure.service \
			ai_stack_backup-drill.service; do \
		$(RENDER) systemd/$$unit > $(DESTDIR)$(UNIT_DIR)/$$unit || exit 1; \
	done
	for unit in ai_stack_backup.service ai_stack_backup-drill.service; do \
		rm -f $(DESTDIR)$(UNIT_DIR)/$$unit.d/monitoring.conf; \
		if [ -n "$(METRICS_DIR)$(NETWORK_ALLOW)" ]; then \
			install -d $(DESTDIR)$(UNIT_DIR)/$$unit.d && \
			sh systemd/monitoring-dropin.sh $$unit "$(METRICS_DIR)" "$(NETWORK_ALLOW)" \
				> $(DESTDIR)$(UNIT_DIR)/$$unit.d/monitoring.conf || exit 1; \
		fi; \
	done
	install -m 644 systemd/ai_stack_backup.timer systemd/ai_stack_backup-drill.timer \
		$(DESTDIR)$(UNIT_DIR)/
	@if [ -z "$(DESTDIR)" ] && [ -d /run/systemd/system ]; then systemctl daemon-reload; fi

lint:
	$(PYTHON) -m ruff check --select F,E,W,B --ignore B904,B905,F811 --line-length 100 scripts tests dev bench
