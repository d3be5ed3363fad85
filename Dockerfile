# syntax=docker/dockerfile:1
#
# authz-service image: docker build -t ghcr.io/example/authz-service:0.1.0 .
# Needs BuildKit (default in Docker >= 23) for the RUN --mount below.
#
# Base image pinned by exact Python patch version. For fully reproducible
# builds also pin the digest: python:3.11.14-slim-bookworm@sha256:<digest>
# (`docker buildx imagetools inspect python:3.11.14-slim-bookworm`).

# --- builder: build the project wheel and every dependency wheel -------------
FROM python:3.11.14-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /src
# Only what the build needs (.dockerignore keeps the context to these too).
COPY pyproject.toml README.md LICENSE ./
COPY authz_service ./authz_service

# Optional extras built in: tracing (OpenTelemetry, off unless OTEL_* variables
# configure it; docs/tracing.md). Build without: --build-arg AUTHZ_EXTRAS=
ARG AUTHZ_EXTRAS=tracing

# /wheels: authz_service-*.whl plus wheels of all runtime dependencies
# (binary manylinux wheels from PyPI; nothing is compiled).
RUN pip wheel --no-cache-dir --wheel-dir /wheels ".${AUTHZ_EXTRAS:+[$AUTHZ_EXTRAS]}"

# --- runtime: the wheels installed, nothing else ---------------------------
FROM python:3.11.14-slim-bookworm

LABEL org.opencontainers.image.title="authz-service" \
      org.opencontainers.image.description="Envoy ext_authz (gRPC v3) sidecar verifying Amazon Cognito M2M access tokens" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The wheels are bind-mounted from the builder, not copied, so they never end
# up in a layer. --no-index: only the wheels built above, no network. The
# build backends the base image ships (setuptools, wheel) are removed: the
# service never builds anything. pip compiles the .pyc files at install time,
# so nothing is written at run time (read-only root filesystem).
ARG AUTHZ_EXTRAS=tracing
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --find-links=/wheels \
      "$(echo /wheels/authz_service-*.whl)${AUTHZ_EXTRAS:+[$AUTHZ_EXTRAS]}" \
    && pip uninstall --yes setuptools wheel \
    && groupadd --system --gid 10001 authz \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin authz

# Numeric, so Kubernetes' runAsNonRoot can verify it.
USER 10001:10001
WORKDIR /

# 9191: ext_authz gRPC + grpc.health.v1; 8181: /healthz, /readyz, /metrics.
EXPOSE 9191 8181

# No HEALTHCHECK: Kubernetes probes (deploy/k8s/deployment.yaml) do that.
ENTRYPOINT ["authz-service"]
CMD ["serve"]
