# ksbpf — see README.md.  Every target runs as root.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

.PHONY: setup demo test clean

## setup: Debian packages, kernel headers for bcc, .venv with ksbpf (idempotent)
setup:
	@bash deploy/setup-host.sh $(abspath $(VENV))

## demo: build a namespace lab with a real WireGuard tunnel and show the kill switch
demo: setup
	@$(VENV)/bin/ksbpf demo

## test: the whole suite (unit, BPF_PROG_TEST_RUN, namespace integration, demo)
test: setup
	@$(PY) -m pytest $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
