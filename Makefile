# The two commands of the README: `make demo` and `make test`. Each creates the
# virtualenv it needs from nothing but a Python 3.11+ interpreter.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-containers proto bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[server,test,demo,bench,torch,jax,keras,tensorflow]"  # torch: the local CPU wheel
	$(PY) -m pip install --quiet --no-deps "tf-keras==2.21.0"  # its tensorflow requirement is tensorflow-cpu's
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/optserve demo

# The framework extras (torch, jax, keras, tensorflow and tf-keras) let the tests run the adapters and examples/.
test: $(STAMP)
	$(PY) -m pytest

# Builds the images of docker/ with podman and runs them (tests/test_containers.py): needs root,
# installs podman, runc and debootstrap when missing. Not part of `make test`.
test-containers: $(STAMP)
	$(PY) -m pip install --quiet -e ".[containers]"
	sh docker/test-containers.sh

# The full run holds optserve against PyTorch RPC and Ray: the peers extra installs them (tests never need it).
bench: $(STAMP)
	$(PY) -m pip install --quiet -e ".[peers]"
	$(VENV)/bin/optserve bench --json bench.json

# Regenerates the committed stubs in client/generated from proto/ (tests check they are fresh).
proto: $(STAMP)
	$(PY) proto/generate.py client/generated

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
