# One image for every agent: `docker run IMAGE worker agents.inventory:agent`.
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY choreo ./choreo
COPY agents ./agents
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 choreo && mkdir -p /home/choreo/state && chown choreo /home/choreo/state
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
USER choreo
WORKDIR /home/choreo
ENV CHOREO_STATE_DIR=/home/choreo/state PYTHONUNBUFFERED=1
ENTRYPOINT ["choreo"]
CMD ["--help"]
