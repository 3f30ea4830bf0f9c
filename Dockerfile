# syntax=docker/dockerfile:1
# The ossensor image: the sensor (entrypoint `ossensor`) and the reference vSensor
# (`ossensor-vsensor`), in one virtual environment. Build:
#   docker build -t ossensor .
# Behind a TLS-intercepting proxy, hand pip the CA bundle as a build secret:
#   docker build --secret id=ca-bundle,src=/etc/ssl/certs/ca-certificates.crt -t ossensor .
# BASE must be Debian bookworm (or a derivative): both stages take python3 from its archive, so
# the virtual environment built in the first stage runs on the interpreter of the second.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS build
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Unpinned on purpose: the archive's current security updates are wanted, and exact Debian
# versions disappear from the archive, which would break the build.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ossensor_core ossensor_core
COPY plugins plugins
COPY vsensor vsensor
# Every dependency ships binary wheels for CPython 3.11 on x86-64 and arm64: no compiler needed.
RUN --mount=type=secret,id=ca-bundle \
    if [ -s /run/secrets/ca-bundle ]; then export PIP_CERT=/run/secrets/ca-bundle; fi \
    && python3 -m venv /opt/ossensor \
    && /opt/ossensor/bin/pip install --no-cache-dir --disable-pip-version-check \
       /src /src/vsensor \
    && /opt/ossensor/bin/ossensor --version

FROM ${BASE}
ARG BASE
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="ossensor" \
      org.opencontainers.image.description="Plugin-based network traffic sensor for cloud and Kubernetes hosts, with the reference vSensor" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}"
# libpcap compiles the BPF filters (ossensor_core/capture/bpf.py loads it with ctypes).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 libpcap0.8 ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /opt/ossensor /opt/ossensor
ENV PATH=/opt/ossensor/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    OSSENSOR_CONFIG_PATH=/etc/darktrace/ossensor.cfg \
    OSSENSOR_SPOOL_DIR=/var/spool/ossensor
# The sensor runs as UID 0 with every capability dropped but NET_RAW and NET_ADMIN (deploy/):
# Kubernetes gives a non-root user no effective capabilities, so there is no USER line. With a
# read-only root file system, the configuration folder and the spool are volumes.
VOLUME ["/etc/darktrace", "/var/spool/ossensor"]
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s CMD ["ossensor", "health"]
ENTRYPOINT ["ossensor"]
CMD ["run"]
