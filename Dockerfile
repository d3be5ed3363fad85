# syntax=docker/dockerfile:1
#
# authz-service image (docs/image.md): `make image`, or
#   docker build -t authz-service:0.1.0 .
# Behind a TLS-intercepting proxy, hand pip the proxy's CA bundle as a build secret: it is mounted
# for the one RUN that downloads, never stored in a layer:
#   docker build --secret id=pip-ca,src=/path/to/ca-bundle.pem -t authz-service:0.1.0 .
# Needs BuildKit (default in Docker >= 23), or podman/buildah, for RUN --mount.
#
# Base image pinned by exact Python patch version. For fully reproducible
# builds also pin the digest: python:3.11.14-slim-bookworm@sha256:<digest>
# (`docker buildx imagetools inspect python:3.11.14-slim-bookworm`).

# --- builder: every wheel the image installs, hashes checked ----------------
FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# Only what the build needs (.dockerignore keeps the context to these too).
COPY requirements ./requirements
COPY pyproject.toml README.md LICENSE ./
COPY authz_service ./authz_service

# /wheels: the locked dependencies (requirements/image.txt: the package's
# dependencies and its tracing extra, which stays off unless OTEL_* variables
# configure it), binary wheels only, each checked against its sha256; then the
# project's wheel, built with the locked build backend (requirements/build.txt).
# The optional secret is a CA bundle for pip (see the top of this file).
RUN --mount=type=secret,id=pip-ca \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
    && pip download --require-hashes --only-binary=:all: --no-deps \
       --dest /wheels -r requirements/image.txt \
    && pip install --require-hashes --only-binary=:all: --no-deps -r requirements/build.txt \
    && pip wheel --no-build-isolation --no-deps --wheel-dir /wheels . \
    && cp requirements/image.txt /wheels/

# --- runtime: the wheels installed, nothing else -----------------------------
FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="authz-service" \
      org.opencontainers.image.description="Envoy ext_authz (gRPC v3 and HTTP) sidecar verifying Amazon Cognito M2M access tokens" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The wheels are bind-mounted from the builder, not copied, so they never end
# up in a layer. --no-index: only the builder's wheels, no network; the hashes
# are checked again; `pip check` proves the set complete. Then everything that
# could install or build a package goes: pip itself, the build backends the
# base image ships (setuptools, wheel) and the copies of pip and setuptools
# that ensurepip keeps. pip compiles the .pyc files at install time, so nothing
# is written at run time (read-only root filesystem).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels --require-hashes --no-deps \
      -r /wheels/image.txt \
    && pip install --no-cache-dir --no-index --no-deps /wheels/authz_service-*.whl \
    && pip check \
    && python -m pip uninstall --yes setuptools wheel pip \
    && python -c "import ensurepip, pathlib, shutil, sysconfig; \
[shutil.rmtree(d, ignore_errors=True) for d in (pathlib.Path(ensurepip.__file__).parent / '_bundled', \
sysconfig.get_config_var('WHEEL_PKG_DIR')) if d]" \
    && groupadd --system --gid 10001 authz \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin authz

# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /

# 9191: ext_authz gRPC + grpc.health.v1; 8181: /healthz, /readyz, /metrics;
# 9192: Envoy's HTTP ext_authz mode, when started with --ext-authz-http-port 9192.
EXPOSE 9191 8181 9192

# No HEALTHCHECK: Kubernetes probes (deploy/k8s/deployment.yaml) do that.
ENTRYPOINT ["authz-service"]
CMD ["serve"]
