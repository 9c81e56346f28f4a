# The two commands of the README: `make serve` and `make test`. Everything else is optional.
PYTHON ?= python3
VENV   ?= .venv
HOST   ?= 127.0.0.1
PORT   ?= 8000
BIN    := $(VENV)/bin

# A stamp per extra set, redone whenever the project's dependencies change.
$(VENV)/.installed-serve: pyproject.toml scripts/setup-venv.sh
	PYTHON=$(PYTHON) MEDSERVE_VENV=$(VENV) scripts/setup-venv.sh
	touch $@

# The tests cover `medserve quantize` and the PostgreSQL stores, so they need those extras.
$(VENV)/.installed-dev: pyproject.toml scripts/setup-venv.sh
	PYTHON=$(PYTHON) MEDSERVE_VENV=$(VENV) scripts/setup-venv.sh dev,quant,postgres
	touch $@ $(VENV)/.installed-serve

$(VENV)/.installed-bench: pyproject.toml scripts/setup-venv.sh
	PYTHON=$(PYTHON) MEDSERVE_VENV=$(VENV) scripts/setup-venv.sh dev,quant,bench,postgres
	touch $@ $(VENV)/.installed-dev $(VENV)/.installed-serve

.PHONY: install serve test test-vllm deploy-check image image-gpu lint typecheck unit bench bench-prefix bench-gateway bench-structured bench-sizing clean

install: $(VENV)/.installed-serve

## Start the server with the packaged default model on http://$(HOST):$(PORT), with a
## random admin key for this run printed at start (real keys: `medserve keys create`)
serve: $(VENV)/.installed-serve
	$(BIN)/medserve serve --host $(HOST) --port $(PORT) --dev-key

## Lint, type-check and run the whole test suite, then the real-vLLM tier (what CI runs)
test: $(VENV)/.installed-dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	scripts/ensure-prometheus.sh
	scripts/ensure-postgres.sh
	$(BIN)/python scripts/run_tests.py
	PYTHON=$(PYTHON) scripts/test-vllm.sh $(BIN)/python
	$(MAKE) --no-print-directory deploy-check

## Only the real-vLLM tier: installs the CPU build of vLLM into .venv-vllm (first time:
## about 0.6 GB, 2-3 min), then drives it through medserve (a few minutes). If the install
## fails it says why and skips; MEDSERVE_VLLM_TIER=skip skips it on purpose.
test-vllm: $(VENV)/.installed-dev
	PYTHON=$(PYTHON) scripts/test-vllm.sh $(BIN)/python

## The deployment files checked offline (systemd units, Kubernetes manifests, compose file,
## Prometheus rules), then the image built with podman from Debian's packages and asked
## /health and a chat completion (installs podman the first time; a few minutes)
deploy-check: $(VENV)/.installed-dev
	scripts/deploy-check.sh $(BIN)/python

## Build the CPU image offline (base from the Debian mirror, cached llama-cpp-python wheel)
## as localhost/medserve:latest
image:
	scripts/build-image.sh

## Build the GPU variant (Containerfile.vllm) as localhost/medserve:gpu, on a host that can
## pull or has loaded the vLLM image (VLLM_IMAGE=... to name a mirrored one)
image-gpu:
	MEDSERVE_IMAGE_FILE=Containerfile.vllm scripts/build-image.sh

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

typecheck: $(VENV)/.installed-dev
	$(BIN)/mypy

## Benchmarks: single-stream HTTP vs in-process, then medserve vs llama-cpp-python's
## server vs llama.cpp's server at 1, 4 and 8 concurrent users, then the audit log's
## cost, then the shared-prefix workload (bench-prefix), then bench-gateway (what medserve
## adds in front of a fast vLLM), then bench-structured (about 40 minutes; run it on an
## otherwise idle machine)
bench: $(VENV)/.installed-bench
	$(BIN)/python tests/bench/single_stream.py
	$(BIN)/python tests/bench/compare.py
	$(BIN)/python tests/bench/audit.py
	$(BIN)/python tests/bench/prefix.py
	$(MAKE) --no-print-directory bench-gateway
	$(MAKE) --no-print-directory bench-structured
	$(MAKE) --no-print-directory bench-sizing

## Memory of a real server (the packaged SmolLM2 at several quantizations, slots x
## context) beside the formulas of deploy/README.md "Sizing" (1-2 minutes)
bench-sizing: $(VENV)/.installed-bench
	$(BIN)/python tests/bench/sizing.py

## JSON-schema-constrained vs free decoding on SmolLM2 at 1 and 8 concurrent requests:
## medserve's engine (as served, and with the grammar applied to the whole vocabulary),
## then llama.cpp's server with the same schema; one run, ratios (a few minutes)
bench-structured: $(VENV)/.installed-bench
	$(BIN)/python tests/bench/structured.py

## What a gateway adds in front of a fast vLLM (a fake one): direct vs medserve with the
## audit log off and on vs LiteLLM's proxy, at 1 and 64 concurrent users, streaming and
## not, with the issue's targets marked PASS/FAIL; then requests/s against LiteLLM with a 2 ms
## upstream, where the gateways are the limit (about 12 min). LiteLLM goes into its own
## .venv-litellm first (pinned, hash-checked; first time ~0.8 GB, 2 min); if that fails,
## its column is skipped and the reason printed.
bench-gateway: $(VENV)/.installed-dev
	PYTHON=$(PYTHON) scripts/setup-litellm-venv.sh \
		|| echo "bench-gateway: LiteLLM's column will be skipped (reason above)"
	$(BIN)/python tests/bench/gateway.py --judge latency
	$(BIN)/python tests/bench/gateway.py --levels 64 --ttft-ms 2 --token-delay-ms 2 --judge throughput

## Only the shared-prefix workload: a ~1,200-token preamble + a short question, medserve vs
## llama.cpp's server with its prompt cache on and off, at 1 and 8 users (about 6 minutes)
bench-prefix: $(VENV)/.installed-bench
	$(BIN)/python tests/bench/prefix.py

clean:
	rm -rf $(VENV) .venv-vllm .venv-litellm .mypy_cache .pytest_cache .ruff_cache
