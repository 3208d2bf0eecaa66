PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# the container image: the base as a build argument (`make base-image` makes localhost/debian-py:bookworm
# without a registry), tagged IMAGE
BASE ?= python:3.11-slim
IMAGE ?= localhost/p2pm:latest

.PHONY: demo test test-quick install clean bench lock lowest wheelhouse base-image image

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml requirements.lock
	$(BIN)/python -m pip install --quiet -c requirements.lock -e '.[test,experiments]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/p2pm run mv37 --out results/demo-mv37

# every test, the container tests included (tests/test_containers.py; they skip, saying why, without podman)
test: $(STAMP)
	$(BIN)/python -m pytest -q

# without the container tests
test-quick: $(STAMP)
	$(BIN)/python -m pytest -q -m "not containers"

bench: $(STAMP)
	$(BIN)/p2pm bench mv37

lock: $(BIN)/python  # requirements.lock: the versions install uses (pyproject.toml keeps the lower bounds)
	$(BIN)/python -m pip install --quiet uv
	$(BIN)/python -m uv pip compile pyproject.toml --extra test --extra experiments --universal --python-version 3.11 --quiet -o requirements.lock --custom-compile-command "make lock"

lowest:  # the lowest versions pyproject.toml allows, in a fresh virtualenv, against the fast tests
	.ci/lowest-versions

# p2pm and every dependency as wheels: what the image installs from (no package index in the build)
wheelhouse: $(BIN)/python
	$(BIN)/python -m pip wheel --quiet -c requirements.lock --wheel-dir build/wheelhouse .

base-image:
	deploy/base-image.sh localhost/debian-py:bookworm

image: wheelhouse
	podman build --build-arg BASE=$(BASE) -t $(IMAGE) -f deploy/Containerfile .

clean:
	rm -rf $(VENV) results build *.egg-info
