# Two commands on a fresh machine: `make demo` and `make test` (CI runs `make test` via .ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv protos test unit e2e demo clean system-deps policy-check docs bench bench-deps test-stress

# The virtualenv with the package (editable) and everything the tests need.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

# Regenerate authz_service/_proto from protos/ (a test fails when they drift).
protos: $(STAMP)
	$(BIN)/python tools/gen_protos.py

# promtool (alert rule tests) comes from Debian's prometheus package, the forward proxy of the egress
# proxy tests from tinyproxy-bin (the binary only: no service is started); CI runs as root on Debian.
system-deps:
	@{ command -v promtool >/dev/null && command -v tinyproxy >/dev/null; } || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends prometheus tinyproxy-bin >/dev/null; }
	@command -v kubectl >/dev/null || echo "warning: kubectl not found; the kustomize test will fail (install kubectl)"

test: $(STAMP) system-deps policy-check docs
	$(BIN)/pytest -q -p no:cacheprovider

# The shipped policies pass `validate --strict` and the example expectations hold (as a ConfigMap repo's CI would run).
policy-check: $(STAMP)
	$(BIN)/authz-service validate --strict authz_service/examples/policy.yaml deploy/k8s/policy.yaml \
	  authz_service/examples/policy-custom-claims.yaml \
	  deploy/istio/sidecar/policy.yaml deploy/istio/ambient/policy.yaml deploy/examples/two-apps/*/policy.yaml
	$(BIN)/authz-service test authz_service/examples/policy.yaml authz_service/examples/policy-tests.yaml
	$(BIN)/authz-service test authz_service/examples/policy-custom-claims.yaml \
	  authz_service/examples/policy-custom-claims-tests.yaml

# The e2e suite under CPU load (one busy loop per core, started and always stopped by the runner) in a
# shuffled order; never part of `make test`. STRESS_SEED=<seed> replays an order, STRESS_ARGS adds
# pytest options (e.g. STRESS_ARGS="-x -k sigterm").
STRESS_SEED ?=
STRESS_ARGS ?=
test-stress: $(STAMP) system-deps
	$(BIN)/python -m tests.stress $(if $(STRESS_SEED),--seed $(STRESS_SEED)) -- -q $(STRESS_ARGS)

# The documentation site (mkdocs.yml, docs/): a strict build, offline. A broken link or anchor, a nav
# entry without a page or a page missing from the nav is an error. (Do not add -v: MkDocs 1.6 skips
# the anchor check at debug verbosity.) NO_MKDOCS_2_WARNING silences Material's end-of-life banner.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --clean --site-dir build/site

unit: $(STAMP)
	$(BIN)/pytest -q -m "not e2e"

e2e: $(STAMP)
	$(BIN)/pytest -q -m e2e

# MODE=grpc (default) or MODE=http: Envoy's ext_authz mode (envoy/envoy.yaml or envoy/envoy-http.yaml).
MODE ?= grpc
demo: $(STAMP)
	$(BIN)/python tools/demo.py --mode $(MODE)

# The benchmark (never part of `make test`): wrk and h2load (nghttp2-client) from Debian, like promtool.
bench-deps:
	@{ command -v wrk >/dev/null && command -v h2load >/dev/null; } || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends wrk nghttp2-client >/dev/null; }

# Prints a markdown table (docs/performance.md explains it); BENCH_ARGS e.g. "--duration 20 --connections 16".
bench: $(STAMP) bench-deps
	$(BIN)/python bench/micro_verify.py
	$(BIN)/python bench/run.py $(BENCH_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis

# Longer soak through a real Envoy (make test runs the same suite for 20 s).
SOAK_SECONDS ?= 300
.PHONY: soak
soak: $(STAMP)
	SOAK_SECONDS=$(SOAK_SECONDS) $(BIN)/pytest -q -s -p no:cacheprovider tests/e2e/test_soak_e2e.py
