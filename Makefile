# The README's two commands: `make demo` (set up .venv, run the embedded demo) and `make test`.
# Both are idempotent: scripts/setup_venv.sh skips installs when nothing it depends on changed.
PY := .venv/bin/python
export PYTHONHASHSEED := 0

.PHONY: setup demo test test-triton test-ext test-props test-compat test-mergekit bench bench-mergekit setup-mergekit \
	lint clean

setup:
	@bash scripts/setup_venv.sh

demo: setup
	$(PY) -m adamerge_fast demo

test: setup
	$(PY) -m pytest -q tests

test-triton: setup
	$(PY) -m pytest -q -m triton tests

test-ext: setup
	$(PY) -m pytest -q -m ext tests

# Optional: mergekit 0.1.5 in its own environment (.venv-mergekit, under the same torch pin) for the comparison
# with mergekit; nothing of it is needed by `make test`.
setup-mergekit:
	@bash scripts/setup_mergekit_venv.sh

test-mergekit: setup setup-mergekit
	ADAMERGE_TEST_MERGEKIT=1 $(PY) -m pytest -q tests/test_mergekit_compat.py

bench-mergekit: setup setup-mergekit
	$(PY) -m benchmarks.bench_mergekit

# The hypothesis property tests of the ops at full size (>= 1000 drawn cases per backend; make test runs a small
# derandomized profile of the same tests). Cases run per backend: runs/props_cases.json.
test-props: setup
	@mkdir -p runs
	ADAMERGE_PROPS=full ADAMERGE_PROPS_REPORT=runs/props_cases.json $(PY) -m pytest -q -m props tests
	@cat runs/props_cases.json

# The drop-in tests, plus FusionBench's own AdaMerging algorithms driving our wrappers: FusionBench 0.2.33 (with
# lightning, hydra, datasets, ...) lives in a separate .venv-compat (scripts/setup_compat_venv.sh), never in .venv.
test-compat: setup
	@bash scripts/setup_compat_venv.sh
	PYTHONPATH=. .venv-compat/bin/python -m pytest -q tests/test_compat_*.py

bench: setup
	$(PY) -m pytest benchmarks --benchmark-only -q
	$(PY) -m benchmarks.adamerging_step

lint: setup
	.venv/bin/ruff check adamerge_fast tests benchmarks tools

clean:
	rm -rf build *.egg-info adamerge_fast/*.so
