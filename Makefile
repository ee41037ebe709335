# Every target creates or reuses the virtualenv in .venv and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
SYSTEM := $(VENV)/.system

.PHONY: demo test lint bench clean bytecode

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,sklearn,mnist1d,torch,mqtt,s3,serve,privacy,dp-sgd,ray]"
	touch $@

# System packages (apt): a software TPM and tpm2-tools, for the TPM enrollment tests;
# Eclipse Mosquitto, the MQTT broker of the MQTT transport's tests and demo; iproute2 and
# nftables for the fault drills (network namespaces, packet loss).
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

lint: $(STAMP)
	$(BIN)/ruff check --no-cache src tests benchmarks examples
	$(BIN)/ruff format --check src tests benchmarks examples
	$(BIN)/mypy

bench: $(STAMP) bytecode
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
	$(BIN)/python benchmarks/store_bench.py
	$(BIN)/python benchmarks/fedbuff_fleet_bench.py
	$(BIN)/python benchmarks/serve_bench.py
	$(BIN)/python benchmarks/privacy_bench.py
	$(BIN)/python benchmarks/secagg_bench.py
	$(BIN)/python benchmarks/ray_bench.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
