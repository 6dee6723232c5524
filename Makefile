# cicc.cloud — every entry point a person or CI needs. Each target sets up what it uses (scripts/setup.sh
# is idempotent), so `make demo` and `make test` work on a fresh Debian/Ubuntu machine.
SHELL := /bin/bash
VENV := .venv
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
PYTEST_ARGS ?=

.PHONY: setup demo demo-host test unit integration lint sanity docs molecule bench cloud-start cloud-stop cloud-status clean

setup:
	@scripts/setup.sh

cloud-start: setup
	@scripts/emulator.sh start

cloud-stop:
	@scripts/emulator.sh stop

cloud-status:
	@scripts/emulator.sh status; scripts/docker-engine.sh status

demo: cloud-start
	@scripts/pipeline.sh

demo-host: cloud-start
	@scripts/demo.sh

# tests/unit: no emulator, no Docker, seconds. tests/integration: against the emulators and the Docker Engine.
unit: setup
	python -m pytest tests/unit $(PYTEST_ARGS)

integration: setup
	python -m pytest tests/integration $(PYTEST_ARGS)

lint: setup
	ansible-lint --offline --profile production

sanity: setup
	@scripts/sanity.sh

docs: setup
	@scripts/docs.sh

molecule: cloud-start
	@scripts/molecule.sh

test: unit integration lint sanity docs molecule

bench: cloud-start
	python bench/run_all.py

clean: cloud-stop
	rm -rf .build
