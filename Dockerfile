# One image for every agent: `docker run IMAGE worker agents.inventory:agent`.
#
# Stage 1 builds the wheel and a virtualenv holding it with the extras a deployment needs
# (OTLP trace export, PostgreSQL/Redis dedup stores); stage 2 copies only that virtualenv, so
# the runtime image carries no build tools, no sources and no pip cache.
FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY choreo ./choreo
COPY agents ./agents
RUN pip wheel --no-deps --wheel-dir /wheels . \
 && python -m venv /opt/choreo \
 && /opt/choreo/bin/pip install "$(ls /wheels/choreo-*.whl)[otlp,postgres,redis]"

FROM python:3.11-slim
# A fixed uid/gid, named numerically below: Kubernetes' runAsNonRoot can only verify a numeric USER.
RUN groupadd --gid 10001 choreo \
 && useradd --create-home --uid 10001 --gid 10001 choreo \
 && mkdir -p /home/choreo/state \
 && chown choreo:choreo /home/choreo/state
COPY --from=build /opt/choreo /opt/choreo
# PYTHONDONTWRITEBYTECODE: the root filesystem may be read-only (Kubernetes manifests).
ENV PATH=/opt/choreo/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    CHOREO_STATE_DIR=/home/choreo/state \
    CHOREO_HTTP_PORT=8080
USER 10001:10001
WORKDIR /home/choreo
# /metrics, /healthz and /readyz of `choreo worker`.
EXPOSE 8080
# Liveness only (/healthz): slim has no curl, so python's urllib asks; urlopen raises on
# anything but 2xx, which makes the check fail. One-off commands (publish, dlq) serve no
# HTTP and are not meant to be health-checked.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('CHOREO_HTTP_PORT', '8080'), timeout=4)"]
ENTRYPOINT ["choreo"]
CMD ["--help"]
