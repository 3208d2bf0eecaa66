PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install clean bench lock lowest

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/p2pm run mv37 --out results/demo-mv37

test: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/p2pm bench mv37

lock: $(BIN)/python  # requirements.lock: the versions install uses (pyproject.toml keeps the lower bounds)
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/python -m uv pip compile pyproject.toml --extra test --universal --python-version 3.11 --quiet -o requirements.lock --custom-compile-command "make lock"

lowest:  # the lowest versions pyproject.toml allows, in a fresh virtualenv, against the fast tests
	.ci/lowest-versions

clean:
	rm -rf $(VENV) results build *.egg-info
