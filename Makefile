# The two commands: `make demo` and `make test`. Both bootstrap .venv from pyproject.toml on
# first use and reuse it afterwards (it is rebuilt when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-vm lint bench docs clean

# First-party plugins: each directory under plugins/ is its own distribution, installed
# (editable) beside reapkit so its entry points register and make test runs its tests.
PLUGINS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml))

$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[test,dev,docs]' \
		$(foreach p,$(PLUGINS),-e '$(p)[test]')
	@touch $@

demo: $(STAMP)
	$(BIN)/reapkit demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS) tests examples $(addsuffix /tests,$(PLUGINS))

# The cgroup v2 subset, in a guest kernel (tests/vmlab/guest.py): pure cgroup v2, PSI, every
# capability. Software emulation here: a targeted subset, a hard timeout, no timing asserts.
VM_TESTS := tests/kernel/test_cgroup_v2.py
test-vm: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[vm]'
	$(BIN)/python -m tests.vmlab.guest --timeout 1700 -- \
		$(BIN)/python -m pytest -p no:cacheprovider -m vm $(PYTEST_ARGS) $(VM_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check src tests examples plugins
	$(BIN)/ruff format --check src tests examples plugins
	$(BIN)/mypy --strict src

bench: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[bench]' && $(BIN)/python -m tests.benchmarks.run

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
