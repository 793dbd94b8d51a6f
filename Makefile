PYTHON ?= .venv/bin/python

.PHONY: bench bench-quick bench-real soak lock

# The benchmark of docs/benchmarks.md: simulated replicas + the proxy in separate processes, real gRPC on
# loopback; rewrites the generated part of docs/benchmarks.md and docs/bench-*.png. BENCH_ARGS=--quick for ~5 min.
# Then real istioctl end to end, through the proxy and directly (needs scripts/install-peers for istioctl).
bench:
	$(PYTHON) -m bench.run $(BENCH_ARGS)
	$(PYTHON) -m bench.istioctl_e2e $(E2E_ARGS)

bench-quick:
	$(PYTHON) -m bench.run --quick $(BENCH_ARGS)

# The same comparison in front of real pilot-discovery replicas (needs scripts/install-peers and
# scripts/install-k8s-peers); rewrites the real-istiod block of docs/benchmarks.md.
bench-real:
	ISTIOCTL_PROXY_E2E_BASE_PORT=27000 $(PYTHON) -m bench.real_istiod $(BENCH_ARGS)

# The reliability suites at full length (docs/security.md): 60 s of 200-stream load and 60 s of faults under
# load, and 3x the default fuzz cases (30k+). Figures go to bench/results/reliability/*.json.
SOAK_SECONDS ?= 60
FUZZ_SCALE ?= 3
soak:
	SOAK_SECONDS=$(SOAK_SECONDS) FUZZ_SCALE=$(FUZZ_SCALE) $(PYTHON) -m pytest -p no:cacheprovider -o timeout=3600 -q \
		tests/test_load.py tests/test_faults.py tests/test_fuzz.py tests/test_errors.py tests/test_security.py

# Re-resolves the image's runtime dependencies into constraints.txt (deploy/Dockerfile installs exactly those).
lock:
	scripts/lock
