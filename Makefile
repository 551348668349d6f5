# Two entry points matter: `make demo` (the main job) and `make test` (the fast test suite).
# Both create or refresh the local virtual environment first.
VENV ?= .venv
PY := $(VENV)/bin/python
# unset or empty: outputs (`?=` kept an empty value, which put the demo's baselines at /demo)
ifeq ($(strip $(MTL_OUTPUT_DIR)),)
override MTL_OUTPUT_DIR := outputs
endif
export MTL_OUTPUT_DIR
DEMO_DIR ?= $(MTL_OUTPUT_DIR)/demo
# absolute, without $(abspath): it splits a path with spaces into words (quoted below, for the shell and Hydra)
DEMO_ABS := $(if $(filter /%,$(firstword $(DEMO_DIR))),$(DEMO_DIR),$(CURDIR)/$(DEMO_DIR))

.PHONY: venv demo test test-slow clean

# The stamp holds pyproject.toml's hash, not a time: a fresh clone (new file times) next to a venv
# installed from the same pyproject does not reinstall.
venv:
	@want=$$(sha256sum pyproject.toml | cut -d' ' -f1); \
	if [ -x $(PY) ] && [ "$$(cat $(VENV)/.installed 2>/dev/null)" = "$$want" ]; then exit 0; fi; \
	set -ex; test -x $(PY) || python3 -m venv $(VENV); \
	$(PY) -m pip install --quiet --upgrade pip; \
	$(PY) -m pip install --quiet -e ".[dev]"; \
	echo "$$want" > $(VENV)/.installed

# Single-task baselines (a multirun writes baselines.json), then the multi-task model with Δm%.
# One shell with `set -e`: any failing step stops the demo with its error (a stale baselines file is
# removed first, so Δm is never computed against an old run); the last line is the elapsed time.
demo: venv
	@start=$$(date +%s); set -e; rm -f "$(DEMO_ABS)/baselines.json"; set -x; \
	$(VENV)/bin/mtl-train -m experiment=scenes_hps name=scenes_stl \
	    task=semseg,depth,normals,edges,classification,regression \
	    baselines.save_to="'$(DEMO_ABS)/baselines.json'"; \
	$(VENV)/bin/mtl-train experiment=scenes_hps baselines.path="'$(DEMO_ABS)/baselines.json'"; \
	{ set +x; } 2>/dev/null; s=$$(( $$(date +%s) - start )); printf 'demo: %02d:%02d\n' $$((s / 60)) $$((s % 60))

test: venv
	$(VENV)/bin/pytest -q -x

test-slow: venv
	$(VENV)/bin/pytest -q -m slow

clean:
	rm -rf outputs multirun
