# The two commands: `make demo` and `make test`. Both bootstrap .venv from pyproject.toml on
# first use and reuse it afterwards (it is rebuilt when pyproject.toml changes).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test test-vm lint bench docs man completions clean

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
VM_TESTS := tests/kernel/test_cgroup_v2.py tests/kernel/test_privileged.py \
	tests/kernel/test_guard.py::test_oom_score_adj_min_on_the_real_kernel \
	tests/kernel/test_guard.py::test_kill_cgroup_v2 \
	tests/kernel/test_syscalls.py::test_oom_score_adj_raise_and_lower \
	tests/kernel/test_syscalls.py::test_cgroup_kill_on_v2_kills_every_member \
	tests/kernel/test_psi.py::test_removing_the_cgroup_ends_the_watch \
	tests/test_cli.py::test_doctor_json_has_the_documented_keys
test-vm: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[vm]'
	$(BIN)/python -m tests.vmlab.guest --timeout 1700 -- \
		$(BIN)/python -m pytest -p no:cacheprovider $(PYTEST_ARGS) $(VM_TESTS)

lint: $(STAMP)
	$(BIN)/ruff check src tests examples plugins man
	$(BIN)/ruff format --check src tests examples plugins man
	$(BIN)/mypy --strict src

bench: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[bench]' && $(BIN)/python -m tests.benchmarks.run

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The man page and the bash and zsh completions, made from the command's argument parser
# (man/generate.py says where to install them).
man: $(STAMP)
	$(BIN)/python man/generate.py --man build/man

completions: $(STAMP)
	$(BIN)/python man/generate.py --completions build/completions

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
