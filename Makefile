# Two commands matter: `make run` starts the chat, `make test` runs every test.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test chaos bench profile lint format clean lock

run: $(VENV)/.installed
	$(BIN)/python server.py $(ARGS)

test: $(VENV)/.installed-test
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# The delivery guarantee under a long storm of faults (tests/chaos.py; needs redis-server), a few
# minutes: `make chaos SEED=42 SECONDS=300`. Without SEED a seed is drawn and printed.
SEED    ?=
SECONDS ?= 120
chaos: $(VENV)/.installed-test
	$(BIN)/python -m tests.chaos --seconds $(SECONDS) $(if $(SEED),--seed $(SEED)) $(CHAOS_ARGS)

# Benchmarks: `make bench` runs them all; `make bench WORKLOADS=history` picks some.
bench: $(VENV)/.installed-test
	$(BIN)/python -m bench.run $(WORKLOADS) $(BENCH_ARGS)

# A flame graph of the server during the fan-out: docs/fanout-flamegraph.svg (needs py-spy).
profile: $(VENV)/.installed-test
	$(BIN)/python -m pip install --quiet py-spy
	$(BIN)/python -m bench.profile

lint: $(VENV)/.installed-test
	$(BIN)/ruff check .

format: $(VENV)/.installed-test
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	touch $@

# Installed with the exact versions CI tested (requirements.lock) as constraints.
$(VENV)/.installed: pyproject.toml requirements.lock $(VENV)/.created
	$(BIN)/python -m pip install --quiet -c requirements.lock -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml requirements.lock $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $@

# requirements.lock afresh: the newest versions pyproject.toml allows, resolved in a clean venv.
# Then `make test`, and commit both files.
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/python -m pip install --quiet --upgrade pip
	.lock-venv/bin/python -m pip install --quiet -e '.[test,redis]'
	{ sed -n '/^#/p' requirements.lock; .lock-venv/bin/python -m pip freeze --exclude-editable; } > requirements.lock.new
	mv requirements.lock.new requirements.lock
	rm -rf .lock-venv

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis test-artifacts
