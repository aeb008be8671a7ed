# The two commands of the README: `make demo` and `make test`. Each sets up what it needs.
SHELL := /bin/bash
PY := .venv/bin/python

.PHONY: setup setup-test demo test test-slow bench lint mutants planted

setup:
	@scripts/setup.sh

setup-test:
	@scripts/setup.sh --test

# exit 3 means the assessment completed and a claim did not pass: a verdict, not a failure of the command
demo: setup
	@.venv/bin/trustcase demo || [ $$? -eq 3 ]

test: setup-test
	@$(PY) -m pytest -q

test-slow: setup-test
	@$(PY) -m pytest -q -m slow

bench: setup
	@for b in bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

lint: setup
	@$(PY) -m ruff check trustcase tests bench use_cases

# mutation testing of certification, statistics/verdicts and performance (mutmut, scratch copies, 2 workers):
# scores and survivors in build/mutants/*.json, reported in docs/testing.md. A seeded sample of one chunk, e.g.
# make mutants MUTANTS="--sample 250 --seed 0 certification" (the killed share with its exact 95% interval)
mutants: setup-test
	@$(PY) -m pip install -q -c constraints.txt mutmut==3.8.1
	@$(PY) scripts/mutants.py $(MUTANTS)

# the ten bugs of issue 19, planted one at a time in a scratch copy: each must fail the test written for it
planted: setup-test
	@$(PY) scripts/planted_bugs.py
