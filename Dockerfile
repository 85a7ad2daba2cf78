# sharelatex-init as the container's PID 1, on the Overleaf / ShareLaTeX image you run:
#
#   docker build --build-arg BASE_IMAGE=sharelatex/sharelatex:5.5.4 -t my-overleaf .
#
# from a clean clone with a networked engine (Debian's or Ubuntu's archive and PyPI), with or
# without BuildKit. Two stages: `wheels` makes this project's wheel and its dependencies' from
# the sources in the context (pip from PyPI; or from a deps/ dir of wheels in the context first,
# as scripts/build-images stages one for offline builds and the tests); the image installs those
# wheels and nothing else of the build (no compiler, no pip cache, no sources).
ARG BASE_IMAGE=sharelatex/sharelatex:latest

# --- system: what both stages take from the base's own archive --------------------------------
FROM ${BASE_IMAGE} AS system
ARG DEBIAN_FRONTEND=noninteractive
SHELL ["/bin/bash", "-euo", "pipefail", "-c"]

# Python for the init, Debian's docker.io for the inner engine of docker-in-docker, and tini (a
# few kB) as the reference init of scripts/bench/docker-stop (`--entrypoint tini`). First, so
# that it changes only with the base. gVisor's runsc (Debian's package, 23 MB) for
# OVERLEAF_INIT_COMPILE_RUNTIME=runsc; a base whose archive lacks it builds without, and the
# init then refuses runsc with the fix. e2fsprogs (mkfs.ext4, e2fsck) for the compiles root's
# own filesystem in docker-in-docker (OVERLEAF_INIT_COMPILES_SIZE): Priority required in Debian,
# but not every slimmed base keeps it.
RUN apt-get update -q \
 && apt-get install -y -q --no-install-recommends python3 python3-venv ca-certificates docker.io \
      tini e2fsprogs \
 && { apt-get install -y -q --no-install-recommends runsc \
      || echo "runsc is not in this base's archive: compiles can run under runc only"; } \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb

# --- wheels: the project's wheel and its dependencies', made from the context -----------------
FROM system AS wheels
ARG BASE_IMAGE
# The package needs Python 3.11+ (older Overleaf images are Ubuntu 20.04's, with 3.8): said once,
# plainly, rather than as pip's resolver error.
RUN python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
 || { echo "error: BASE_IMAGE=${BASE_IMAGE} has Python $(python3 -c 'import platform; print(platform.python_version())'); sharelatex-init needs 3.11 or newer: build on an image of Debian 12, Ubuntu 24.04 or newer" >&2; exit 1; }
# pip's own settings, for a site behind a PyPI mirror or a TLS-intercepting proxy; unset, pip
# uses PyPI and the base's CA store.
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_TRUSTED_HOST
# The context is what .dockerignore lets through: pyproject.toml, init/, rootfs/ and, when
# present, deps/. (Not the README: the package has no long description, so that an edit of the
# docs does not make another image.)
COPY . /src/
RUN python3 -m venv /tmp/build \
 && pip=(/tmp/build/bin/pip wheel --no-cache-dir -q --disable-pip-version-check -w /tmp/all) \
 && if [[ -d /src/deps ]]; then \
      # Offline first; a wheel in deps/ that does not fit this base's Python is fetched instead.
      "${pip[@]}" --no-index --find-links /src/deps /src \
        || "${pip[@]}" --find-links /src/deps /src; \
    else \
      "${pip[@]}" /src; \
    fi \
 && mkdir -p /wheels/app /wheels/deps \
 && mv /tmp/all/sharelatex_init-*.whl /wheels/app/ \
 && mv /tmp/all/*.whl /wheels/deps/

# --- the image -------------------------------------------------------------------------------
FROM system
ARG BASE_IMAGE

# The dependencies in a layer of their own (their wheels' bytes do not change with the code): a
# code change rebuilds only the layers below.
COPY --from=wheels /wheels/deps/ /tmp/sharelatex-init/deps/
RUN python3 -m venv /opt/sharelatex-init \
 && /opt/sharelatex-init/bin/pip install --no-cache-dir -q --disable-pip-version-check \
      --no-index /tmp/sharelatex-init/deps/*.whl \
 && rm -rf /tmp/sharelatex-init

COPY --from=wheels /wheels/app/ /tmp/sharelatex-init/app/
RUN /opt/sharelatex-init/bin/pip install --no-cache-dir -q --no-deps --no-index \
      --disable-pip-version-check /tmp/sharelatex-init/app/*.whl \
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
