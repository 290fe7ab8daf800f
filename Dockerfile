# syntax=docker/dockerfile:1
# meshguard: the admission webhook server (`meshguard serve`) and the injected init container (`meshguard netinit`).
# Build: docker build -t meshguard:0.1.0 .

# Both stages use the same Python, so the virtualenv built in the first runs unchanged in the second.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS builder
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN python -m venv /opt/venv
WORKDIR /src
# The dependencies first, against an empty package (with a placeholder version, which the package metadata reads
# from it), so a change to the code does not reinstall them. Every dependency ships binary wheels: no compiler is
# needed here either.
COPY pyproject.toml README.md ./
RUN mkdir webhook && echo '__version__ = "0"' > webhook/__init__.py \
    && pip install --no-cache-dir --prefer-binary . \
    && pip uninstall --yes meshguard
COPY webhook ./webhook
RUN pip install --no-cache-dir --no-deps .

FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="meshguard" \
      org.opencontainers.image.description="Kubernetes admission webhook: injects an Envoy sidecar with mutual TLS and enforces mTLS and NetworkPolicy coverage" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${PYTHON_IMAGE}"
# iptables: `meshguard netinit` programs the pod's traffic redirection; only the init container runs it, as root
# with NET_ADMIN through its own securityContext. Unpinned: the base image's suite fixes the version, and
# pinning a Debian revision breaks the build at its next security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends iptables \
    && rm -rf /var/lib/apt/lists/*
COPY --from=builder /opt/venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Non-root by number, so Kubernetes' runAsNonRoot can verify it without a passwd entry. No HEALTHCHECK:
# Kubernetes probes /healthz and /readyz.
USER 65532:65532
ENTRYPOINT ["meshguard"]
CMD ["serve", "--config", "/etc/meshguard/config.yaml"]
