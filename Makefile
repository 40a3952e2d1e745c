# One entry point for development. `make test` and `make demo` work from a clean clone on Debian 12:
# they create the virtual environment they need (scripts/bootstrap installs python3-venv when missing).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: dev check test test-debian test-packaging deb rpm demo lint fmt bench clean help

help:
	@echo "make dev    create .venv with kmagent, the emulator and the test tools"
	@echo "make check  the quick loop (under 3 minutes): lint, unit tests, the simulator's CI seeds"
	@echo "make test   run the test suite (what CI runs; about 35 minutes)"
	@echo "make test-debian  the same suite on Debian 12's python3 and python3-* packages (no venv, no pip)"
	@echo "make deb    build the .deb into dist/ (installs the build dependencies with apt)"
	@echo "make rpm    build the .rpm into dist/ (installs rpm with apt)"
	@echo "make test-packaging  build both, then lintian, the unit checks, the packages' contents, the chroot install"
	@echo "make demo   run the demo: a local emulated cluster healing itself"
	@echo "make lint   ruff and mypy"
	@echo "make bench  run the benchmarks; figures go to docs/benchmarks.md"
	@echo "make clean  remove .venv and build outputs"

$(STAMP): pyproject.toml emulator/pyproject.toml scripts/bootstrap
	PYTHON=$(PYTHON) scripts/bootstrap $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test,lint]' -e ./emulator
	touch $(STAMP)

dev: $(STAMP)

test: $(STAMP)
	$(BIN)/pytest

# Before every commit: no cluster, no network, no root needed.
check: lint
	$(BIN)/pytest -q -p no:cacheprovider tests/unit tests/sim

# Debian's own stack, the compatibility floor; installs the python3-* packages it needs with apt when missing.
test-debian:
	scripts/test-debian -m "not slow"

deb:
	scripts/build-deb

rpm:
	scripts/build-rpm

# The packages as built: tests/packaging on Debian's python3 (lintian, the contents of dist/, and the .deb
# installed into a Debian 12 chroot as root). The suites above also collect tests/packaging: without dist/ the
# artefact tests skip, the unit checks run.
test-packaging: deb rpm
	scripts/apt-install lintian man-db bash-completion systemd
	scripts/test-debian tests/packaging -m packaging

demo: $(STAMP)
	$(BIN)/python -m emulator.lab.demo

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench.emulator_add_cost
	$(BIN)/python -m bench.anchor_failover

fmt: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) build dist *.egg-info .pytest_cache .mypy_cache .ruff_cache
