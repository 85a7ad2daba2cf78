# sharelatex-init as the container's PID 1: on the ShareLaTeX image (the default base), or on the
# local Debian base that scripts/build-images makes with debootstrap (`--only app`: offline
# builds and the tests, since no registry is reachable there).
ARG BASE_IMAGE=sharelatex/sharelatex:latest
FROM ${BASE_IMAGE}
ARG BASE_IMAGE

ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]

# Python for the init, Debian's docker.io for the inner engine of docker-in-docker, and tini (a
# few kB) as the reference init of scripts/bench/docker-stop (`--entrypoint tini`). First, so
# that it changes only with the base. gVisor's runsc (Debian's package, 23 MB) for
# OVERLEAF_INIT_COMPILE_RUNTIME=runsc; a base whose archive lacks it builds without, and the
# init then refuses runsc with the fix.
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates docker.io \
      tini \
 && { apt-get install -y -q --no-install-recommends runsc \
      || echo "runsc is not in this base's archive: compiles can run under runc only"; } \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

# The dependencies in a layer of their own: a code change rebuilds only the layers below.
# deps/ holds the wheels the builder downloaded (the build then needs no PyPI; a wheel that
# does not fit this base's Python is fetched instead).
COPY requirements.txt /tmp/sharelatex-init/requirements.txt
COPY deps/ /tmp/sharelatex-init/deps/
RUN python3 -m venv /opt/sharelatex-init \
 && pip=(/opt/sharelatex-init/bin/pip install --no-cache-dir -q --disable-pip-version-check \
         --find-links /tmp/sharelatex-init/deps -r /tmp/sharelatex-init/requirements.txt) \
 && { "${pip[@]}" --no-index || "${pip[@]}"; } \
 && rm -rf /tmp/sharelatex-init

COPY wheels/ /tmp/sharelatex-init/wheels/
RUN /opt/sharelatex-init/bin/pip install --no-cache-dir -q --no-deps --no-index \
      --disable-pip-version-check /tmp/sharelatex-init/wheels/*.whl \
 && ln -sf /opt/sharelatex-init/bin/sharelatex-init /usr/local/bin/sharelatex-init \
 && rm -rf /tmp/sharelatex-init

COPY rootfs/ /

ARG VERSION=0.0.0
LABEL org.opencontainers.image.title="sharelatex-init" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.base.name="${BASE_IMAGE}" \
      org.opencontainers.image.description="PID 1 for ShareLaTeX / Overleaf with sandboxed compiles" \
      org.opencontainers.image.licenses="AGPL-3.0-or-later"
STOPSIGNAL SIGTERM
# Healthy: the init and its services run (a crash-looping service is not healthy). Readiness
# for compiles is `status --check ready` (Kubernetes: an exec readiness probe).
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
  CMD ["sharelatex-init", "status", "--check", "healthy"]
ENTRYPOINT ["sharelatex-init"]
CMD ["run"]
