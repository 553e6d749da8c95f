# Build, demo and test entry points for the rmsops.rms collection and rmsd.
# Everything runs from a repo-local virtualenv (.venv) pinned by constraints.txt.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := $(CURDIR)/.venv
BIN := $(VENV)/bin
VENV_STAMP := $(VENV)/.installed
DEMO_STAMP := $(VENV)/.installed-demo
BUILD := $(CURDIR)/build

# The collection is resolved from this repository through a symlink, so edits
# are live without a build/install step.
COLLECTIONS_ROOT := $(BUILD)/collections
COLLECTION_LINK := $(COLLECTIONS_ROOT)/ansible_collections/rmsops/rms
export ANSIBLE_COLLECTIONS_PATH := $(COLLECTIONS_ROOT)
# Ansible's own state stays in the build tree too: no stale copy of the collection in
# ~/.ansible/collections can shadow the working tree.
export ANSIBLE_HOME := $(BUILD)/ansible-home
export PATH := $(BIN):$(PATH)
# pip's download cache too (the virtualenv, the wheelhouse the server role builds): nothing is written
# outside the checkout unless the caller chose a cache of its own.
export PIP_CACHE_DIR ?= $(BUILD)/pip-cache

DEMO_PLAYBOOK := playbooks/demo.yml
DEMO_INVENTORY := playbooks/inventories/demo
DEMO_ARGS ?=

TEST_STAGES := lint sanity pytest molecule

# Debian packages the stages use (.ci/run installs them): each stage checks for its own first, and says
# which apt-get command installs what is missing (scripts/check-packages.sh).
SANITY_PACKAGES := git
PYTEST_PACKAGES := postgresql haproxy softhsm2 openssl chromium
MOLECULE_PACKAGES := $(PYTEST_PACKAGES) podman runc mmdebstrap openssh-client
CHECK_PACKAGES := scripts/check-packages.sh

.PHONY: help venv collection demo docs test packages $(TEST_STAGES) clean

help:
	@echo "make venv        create .venv (pinned by constraints.txt)"
	@echo "make collection  make rmsops.rms resolvable from build/collections"
	@echo "make demo        run $(DEMO_PLAYBOOK) against the local demo inventory (DEMO_ARGS=...)"
	@echo "make docs        lint the docs and render them as reStructuredText into $(DOCS_DEST)"
	@echo "make test        $(TEST_STAGES), stopping at the first failure"
	@echo "make packages    check for the Debian packages the tests need (prints the apt-get command)"
	@echo "make clean       remove .venv, build and .demo"

venv: $(VENV_STAMP)

# The Makefile too: the package lists below live here.
$(VENV_STAMP): constraints.txt rmsd/pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt \
		-e 'rmsd[test]' ansible-core molecule ansible-lint ruff mypy jwcrypto schemathesis pytest supervisor \
		ansible-builder antsibull-changelog antsibull-docs
	touch $@ $(DEMO_STAMP)

# The demo needs Ansible only on the controller side: the server role builds rmsd's own virtualenv.
$(DEMO_STAMP): constraints.txt Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c constraints.txt ansible-core
	touch $@

collection: $(COLLECTION_LINK)

$(COLLECTION_LINK):
	mkdir -p $(dir $@)
	ln -sfn $(CURDIR) $@

demo: $(DEMO_STAMP) collection
	$(BIN)/ansible-playbook -i $(DEMO_INVENTORY) $(DEMO_PLAYBOOK) $(DEMO_ARGS)

# The module and role docs and the guides (docs/docsite/), as antsibull-docs renders them for a docsite.
DOCS_DEST := $(BUILD)/docs

docs: venv collection
	$(BIN)/antsibull-docs lint-collection-docs --plugin-docs .
	rm -rf $(DOCS_DEST) && mkdir -p $(DOCS_DEST)
	$(BIN)/antsibull-docs collection --use-current --fail-on-error --dest-dir $(DOCS_DEST) rmsops.rms
	@# antsibull-docs copies the guides only; their images (../images/ from a guide) go beside them.
	if [ -d docs/docsite/images ]; then cp -r docs/docsite/images $(DOCS_DEST)/collections/rmsops/rms/; fi

packages:
	@$(CHECK_PACKAGES) $(sort $(SANITY_PACKAGES) $(MOLECULE_PACKAGES))

# Each stage reports its duration; the first failing stage stops the run. Missing packages are
# reported before the first stage.
test: packages venv collection
	@passed=0; \
	for stage in $(TEST_STAGES); do \
		start=$$(date +%s); \
		echo "=== $$stage"; \
		$(MAKE) --no-print-directory $$stage; \
		echo "=== $$stage passed in $$(( $$(date +%s) - start ))s"; \
		passed=$$((passed + 1)); \
	done; \
	echo "stages: $$passed passed, 0 failed"

# antsibull-changelog: the fragments and changelogs/changelog.yaml are valid.
# ansible-lint --offline: lint the working tree through the collection symlink
# instead of a built copy (and never reach for Ansible Galaxy).
lint: venv collection
	$(BIN)/ruff check rmsd plugins tests scripts benchmarks roles/server/files roles/config_database/files molecule
	cd rmsd && $(BIN)/mypy
	@# ansible-lint installs this collection into ANSIBLE_HOME and keeps that copy while galaxy.yml's
	@# version stays the same: remove it, so the working tree is what gets linted.
	rm -rf $(BUILD)/ansible-home/collections
	$(BIN)/ansible-lint --offline --profile production
	$(BIN)/antsibull-changelog lint
	$(BIN)/antsibull-changelog lint-changelog-yaml changelogs/changelog.yaml

sanity: venv
	@$(CHECK_PACKAGES) $(SANITY_PACKAGES)
	scripts/sanity.sh

# Three workers on two cores: much of the time goes to waiting for subprocesses. A test file
# stays on one worker, with its module-scoped servers. The slowest tests are listed at the end.
PYTEST_ARGS ?= -x -q -n 3 --dist loadfile --durations=15

pytest: venv collection
	@$(CHECK_PACKAGES) $(PYTEST_PACKAGES)
	cd rmsd && $(BIN)/pytest $(PYTEST_ARGS)
	$(BIN)/pytest $(PYTEST_ARGS) tests

# Two lanes side by side (much of a scenario's time is waiting), about as long as each other:
# cluster, hsm, key_rotation, backup_restore and default one after the other; hosts (podman
# containers reached over SSH, the longest) beside them. cluster, hsm and key_rotation share rmsd's virtualenv
# under build/: cluster installs it first, the others find it installed and change nothing. Every
# scenario installs from the same wheelhouse, built once in the controller's cache. Scenarios that may
# run at the same time use addresses of their own. scripts/molecule-lanes.sh keeps each scenario's
# output in build/molecule-logs/, prints it whole when it ends, and ends with a recap of why any failed.
MOLECULE_LANES := cluster,hsm,key_rotation,backup_restore,default hosts
MOLECULE_LOGS := $(BUILD)/molecule-logs

molecule: venv collection
	@$(CHECK_PACKAGES) $(MOLECULE_PACKAGES)
	@scenarios=$$(find molecule -mindepth 2 -maxdepth 2 -name molecule.yml -printf '%h\n' | xargs -rn1 basename | sort); \
	laned=$$(echo $(MOLECULE_LANES) | tr ', ' '\n\n' | sort); \
	test -n "$$scenarios" && test "$$scenarios" = "$$laned" || \
		{ echo "MOLECULE_LANES ($(MOLECULE_LANES)) must name every scenario under molecule/: $$scenarios"; exit 1; }; \
	MOLECULE_LOGS=$(MOLECULE_LOGS) scripts/molecule-lanes.sh $(MOLECULE_LANES)

# The demo node keeps running after `make demo`; stop it before its files go. Releases before 0.2.0 ran
# the demo under systemd when root on a systemd machine: that unit goes too, when it is this checkout's.
LEGACY_DEMO_UNIT := /etc/systemd/system/rmsd-rms-demo.service

# supervisorctl shutdown returns at once; supervisord exits after rmsd has drained and stopped (its
# stopwaitsecs is 15): clean waits for that exit, 30 s at most, so no node outlives its folder.
clean:
	for conf in .demo/nodes/*/supervisord.conf; do \
		if [ -e "$$conf" ]; then \
			pid=$$(cat "$$(dirname "$$conf")/supervisord.pid" 2>/dev/null || true); \
			.demo/venv/bin/supervisorctl -c "$$conf" shutdown || true; \
			for _ in $$(seq 150); do \
				if [ -z "$$pid" ] || ! kill -0 "$$pid" 2>/dev/null; then pid=; break; fi; sleep 0.2; \
			done; \
			if [ -n "$$pid" ]; then echo "supervisord (pid $$pid, $$conf) is still running after 30 s: stop it, then run make clean again"; exit 1; fi; \
		fi; \
	done
	if [ -w $(dir $(LEGACY_DEMO_UNIT)) ] && grep -qF '$(CURDIR)/.demo/' $(LEGACY_DEMO_UNIT) 2>/dev/null; then \
		systemctl disable --now $(notdir $(LEGACY_DEMO_UNIT)) && rm -f $(LEGACY_DEMO_UNIT) && systemctl daemon-reload; \
	fi
	rm -rf $(VENV) $(BUILD) .demo
