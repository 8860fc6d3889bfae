# syntax=docker/dockerfile:1
# fabloop's image: the flow runs of the Docker and Kubernetes work pools
# (deployments/container.py), and the `fabloop` command line for setting up a stack.
#
#   docker build -t fabloop:0.1.0 .
#
# Runtime dependencies only, exactly as requirements.lock pins them (the test tools
# live in requirements-test.lock and never reach this image); the code is baked in
# at /app, the directory the container deployments' pull step moves to.
# tests/unit/test_container_image.py keeps these invariants.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    UV_NO_CACHE=1
# uv only installs here (the same version scripts/setup.sh uses); it stays in this stage.
RUN python -m pip install "uv==0.13.9" \
 && python -m venv /opt/venv
WORKDIR /src
# The lock alone first: the dependency layer is rebuilt only when the lock changes.
COPY requirements.lock ./
# Compiled at install: the runtime sets PYTHONDONTWRITEBYTECODE and its user cannot write
# /opt/venv, so bytecode not written here would be compiled again by every flow run.
RUN uv pip install --python /opt/venv/bin/python --compile-bytecode --no-deps --requirement requirements.lock
COPY . .
# fabloop itself, then a check that fails the build if a test tool slipped into the runtime lock.
RUN uv pip install --python /opt/venv/bin/python --compile-bytecode --no-deps . \
 && /opt/venv/bin/python -m pip check \
 && /opt/venv/bin/python -c "import importlib.metadata as m, sys; \
test = {'pytest', 'playwright', 'ruff', 'mypy', 'import-linter'}; \
found = sorted(test & {d.metadata['Name'].lower() for d in m.distributions()}); \
sys.exit(f'test tools in the runtime image: {found}' if found else 0)"

FROM ${PYTHON_IMAGE} AS runtime
# LightGBM's wheel links the system OpenMP runtime, which the slim image lacks.
# Debian's security updates move these versions; the base image tag pins the release.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends libgomp1 \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 fabloop \
 && useradd --system --uid 10001 --gid fabloop --home-dir /home/fabloop --create-home \
      --shell /usr/sbin/nologin fabloop
COPY --from=build /opt/venv /opt/venv
# The project tree from the build context (flows/ holds the deployments' entrypoints),
# owned by root: the run's user reads it and writes only under its home.
COPY . /app
# A flow run imports fabloop from /app (its working directory comes first on sys.path): compiled too.
RUN /opt/venv/bin/python -m compileall -q /app/fabloop
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PREFECT_HOME=/home/fabloop/.prefect \
    FABLOOP_HOME=/home/fabloop/.fabloop
WORKDIR /app
# Numeric, so that Kubernetes can verify runAsNonRoot.
USER 10001:10001
CMD ["fabloop", "--help"]
