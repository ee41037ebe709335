# Every target creates or reuses the virtualenv in .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SYSTEM := $(VENV)/.system
# Flower, for the side-by-side benchmarks only: its own venv, never fedge's (not a dependency).
FLOWER_VENV ?= /work/flower-venv
export FLOWER_VENV

.PHONY: demo test test-ceph lint bench clean bytecode flower-venv images test-images

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,sklearn,mnist1d,torch,mqtt,s3,serve,dashboard,privacy,dp-sgd,observe,deploy,ray]"
	touch $@

# System packages (apt): a software TPM and tpm2-tools, for the TPM enrollment tests;
# Eclipse Mosquitto, the MQTT broker of the MQTT transport's tests and demo; iproute2 and
# nftables for the fault drills (network namespaces, packet loss); promtool (Debian's
# prometheus) for the alert rules; Chromium for the dashboard's browser tests; Ceph's
# monitor, OSD and RADOS Gateway for the model registry on a real Ceph RGW.
$(SYSTEM): scripts/system-deps.sh | $(STAMP)
	scripts/system-deps.sh
	touch $@

# A fleet starts a dozen Python processes: with PYTHONDONTWRITEBYTECODE set (as in some
# CI images) each would compile every fedge module again. Up to date, this takes 0.1 s.
bytecode: $(STAMP)
	$(BIN)/python -m compileall -q src examples

demo: $(STAMP) bytecode
	$(BIN)/fedge demo --clients 10 --rounds 5 --out demo-results.json

test: $(STAMP) $(SYSTEM) lint bytecode
	$(BIN)/python -m pytest -q tests

# The model registry against a real single-node Ceph RADOS Gateway (fedge.store.cephrgw,
# ~15 s to start); make test runs these too.
test-ceph: $(STAMP) $(SYSTEM) bytecode
	$(BIN)/python -m pytest -q -m ceph tests/integration

lint: $(STAMP)
	$(BIN)/ruff check --no-cache src tests benchmarks examples deploy
	$(BIN)/ruff format --check src tests benchmarks examples deploy
	$(BIN)/mypy

bench: $(STAMP) $(SYSTEM) bytecode
	$(BIN)/python benchmarks/aggregate_bench.py
	$(BIN)/python benchmarks/sim_bench.py
	$(BIN)/python benchmarks/fedprox_bench.py
	$(BIN)/python benchmarks/fleet_bench.py
	$(BIN)/python benchmarks/mqtt_bench.py
	$(BIN)/python benchmarks/scale_bench.py
	$(BIN)/python benchmarks/mqtt_scale_bench.py
	$(BIN)/python benchmarks/transport_floor_bench.py
	$(BIN)/python benchmarks/trust_bench.py
	$(BIN)/python benchmarks/attack_bench.py
	$(BIN)/python benchmarks/longrun_bench.py
	$(BIN)/python benchmarks/compression_bench.py
	$(BIN)/python benchmarks/fedbuff_bench.py
	$(BIN)/python benchmarks/faults_bench.py
	$(BIN)/python benchmarks/export_bench.py
	$(BIN)/python benchmarks/store_bench.py --ceph
	$(BIN)/python benchmarks/fedbuff_fleet_bench.py
	$(BIN)/python benchmarks/serve_bench.py
	$(BIN)/python benchmarks/privacy_bench.py
	$(BIN)/python benchmarks/secagg_bench.py
	$(BIN)/python benchmarks/metrics_bench.py
	$(BIN)/python benchmarks/dashboard_bench.py
	$(BIN)/python benchmarks/byzantine_bench.py
	$(BIN)/python benchmarks/byzantine_bench.py --secure
	$(BIN)/python benchmarks/ray_bench.py
# against Flower: each measures only fedge's side when $(FLOWER_VENV) is missing
	$(BIN)/python benchmarks/secagg_flower_bench.py
	$(BIN)/python benchmarks/flower_sim_bench.py

# Flower 1.42 (Ray simulation) in its own venv for the *_flower_bench / flower_* benchmarks.
flower-venv:
	test -x $(FLOWER_VENV)/bin/python || $(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/python -m pip install --quiet "flwr[simulation]==1.42.0" scikit-learn numpy

# Container images with Podman (deploy/Containerfile; scripts/images.sh installs podman and
# mmdebstrap if missing and makes the Debian base image). Minutes: not part of `make test`.
images:
	scripts/images.sh

# A server, two node containers and a serve container from those images train and answer;
# prints the images' sizes (benchmarks/results/containers.json).
test-images: $(STAMP) images
	$(BIN)/python benchmarks/container_bench.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
