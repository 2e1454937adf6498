# The two set-up commands of the README: `make run` and `make test`.
# Everything is installed into .venv from this repository's own files; torch stays at 2.13.0 (CPU)
# through constraints.txt, so no requirement can pull a CUDA build.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.dist_fair-installed
PYTEST_ARGS ?=

.PHONY: install run test test-slow test-bench bench clean

$(STAMP): setup.py requirements.txt constraints.txt
	@test -x $(PY) || python3 -m venv $(VENV)
	DS_BUILD_OPS=0 $(PY) -m pip install -q --disable-pip-version-check -c constraints.txt -r requirements.txt
	$(PY) -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@# DeepSpeed's CPU communication op is compiled once per environment into .venv/torch_extensions
	$(VENV)/bin/dist-fair train --build-ops
	@touch $(STAMP)

install: $(STAMP)

## Runs the main job on the built-in BUPT-style data set; the report lands in runs/default/.
run: install
	$(VENV)/bin/dist-fair run --run-dir runs/default

## Fast test suite (slow tests: `make test-slow`). pytest's exit 5 ("no tests collected") is
## turned into an explicit failure: an empty run must never look like a pass.
test: install
	@$(PY) -m pytest $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests - failing on purpose" >&2; exit 1; fi; \
	exit $$rc

## Slow suite (CI runs it after `make test`); its longest cases are marked `bench`: `make test-bench`.
test-slow: install
	@$(PY) -m pytest -m "slow and not bench" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-slow: pytest collected no slow tests" >&2; exit 1; fi; \
	exit $$rc

test-bench: install
	@$(PY) -m pytest -m bench $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test-bench: pytest collected no bench tests" >&2; exit 1; fi; \
	exit $$rc

clean:
	rm -rf runs build *.egg-info .pytest_cache
