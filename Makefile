# The two commands: `make demo` and `make test`. Both bootstrap .venv from pyproject.toml on
# first use and reuse it afterwards (it is updated when pyproject.toml changes). `make demo`
# installs reapkit with the cli extra (rich, for the shows); `make test` (and lint, docs, ...) adds
# the other extras and the plugins.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Two stamps: reapkit with the cli extra (what the demo runs) and everything. The full install touches both.
BASE   := $(VENV)/.installed-base
STAMP  := $(VENV)/.installed

.PHONY: demo test test-vm lint wheels bench bench-vm docs man completions clean

# First-party plugins: each directory under plugins/ is its own distribution, installed
# (editable) beside reapkit so its entry points register and make test runs its tests.
PLUGINS := $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml))

# $(call install,WHAT,PIP ARGUMENTS): create .venv if need be, saying so, and pip install.
# (WHAT names no comma: $(call) splits there.)
define install
	@if test -x $(BIN)/python; then echo "updating .venv: $(1)"; \
	else echo "setting up .venv (once): $(1)" && $(PYTHON) -m venv $(VENV); fi
	@$(BIN)/python -m pip install --quiet --disable-pip-version-check $(2)
endef

$(BASE): pyproject.toml
	$(call install,reapkit and what its interactive commands need,-e '.[cli]')
	@touch $@

EVERYTHING := -e '.[cli,test,dev,docs]' $(foreach p,$(PLUGINS),-e '$(p)[test]')
$(STAMP): pyproject.toml $(addsuffix /pyproject.toml,$(PLUGINS))
	$(call install,reapkit with the cli/test/dev/docs extras and the plugins,$(EVERYTHING))
	@touch $@ $(BASE)

demo: $(BASE)
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
	$(BIN)/ruff check src tests examples plugins .ci man
	$(BIN)/ruff format --check src tests examples plugins .ci man
	$(BIN)/mypy --strict src

# The four distributions (reapkit, plugins/*) built into dist/ and installed from their wheels
# into a clean venv that imports them and lists the plugins (.ci/wheels.py says what it checks).
wheels: $(STAMP)
	$(BIN)/python .ci/wheels.py --python $(PYTHON)

bench: $(STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[bench]' && $(BIN)/python -m tests.benchmarks.run

# The whole-machine head-to-head in a guest (tests/vmlab/bench.py): reapkit against the kernel's
# OOM killer, earlyoom and nohang; writes its section of docs/benchmarks.md. About an hour.
bench-vm: $(STAMP)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[vm,bench]'
	$(BIN)/python -m tests.vmlab.bench $(BENCH_VM_ARGS)

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
