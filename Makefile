# The README's two commands: `make demo` (set up .venv, run the embedded demo) and `make test`.
# Both are idempotent: scripts/setup_venv.sh skips installs when nothing it depends on changed.
PY := .venv/bin/python
export PYTHONHASHSEED := 0

.PHONY: setup demo test test-triton test-ext test-props test-compat test-mergekit bench bench-mergekit setup-mergekit \
	lint clean gpu-check

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

# On a machine with a CUDA GPU: build in place for sm_90, GPU tests, compute-sanitizer, GPU benchmarks (README,
# "GPU check"). Runs with $(PYTHON) (default python3), not the .venv: no dependency on setup. GPU_CHECK_ARGS: e.g.
# --quick (phases 1-2), --dry-run (list the phases and budgets). Expected time per phase on one H200 (estimates,
# no GPU run yet): 1 build 60 s (budget 90), 2 tests 120 s (budget 180) beside 3 sanitizer 60 s (budget 90),
# 4 benchmarks 170 s (budget 210): about 350 s, at most 480 s.
gpu-check:
	PYTHON=$${PYTHON:-python3} bash scripts/gpu_check.sh $(GPU_CHECK_ARGS)

lint: setup
	.venv/bin/ruff check adamerge_fast tests benchmarks tools

clean:
	rm -rf build *.egg-info adamerge_fast/*.so
