# pyexec-connector image. Add the packages your scripts import to localRequirements.txt, then:
#   docker build -t pyexec-connector .
#   docker run -v $PWD/serverConfig:/home/connector/serverConfig -e CONNECTOR_AUTH_TOKEN=... pyexec-connector
# Give it time to finish in-flight queries when stopping: docker stop -t 40 (above shutdownGraceSeconds).
FROM python:3.11-slim

# CONNECTOR_METRICS_PORT turns on /healthz, /readyz and /metrics (the HEALTHCHECK below asks /healthz).
# metricsPort in server.config, when set, wins over it.
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 \
    CONNECTOR_METRICS_PORT=9090

RUN useradd --create-home --uid 10001 --shell /usr/sbin/nologin connector
# The workers' user of the hardened variant (docs/THREAT_MODEL.md): run the image as root with every
# capability dropped but SETUID, SETGID and KILL, and CONNECTOR_WORKER_USER=10002. Unused by default.
RUN useradd --no-create-home --uid 10002 --shell /usr/sbin/nologin --home-dir /nonexistent pyexec-worker

# tini as PID 1: it reaps orphans that user code's subprocesses leave behind (the connector, as PID 1,
# would not) and passes SIGTERM/SIGINT on to the connector.
RUN apt-get update && apt-get install -y --no-install-recommends tini && rm -rf /var/lib/apt/lists/*

# Users' extra packages and the connector's dependencies in ONE pip resolution, so that a pin in
# localRequirements.txt that clashes with ours fails the build with pip's message instead of being
# silently replaced. Its own layer: rebuilt only when either list changes. The "speed" extra (uvloop)
# too: the event loop docs/PERFORMANCE.md's figures were measured on; and the "envs" extra (uv), which
# installs per-script environments when scriptDependencies is on (docs/ENVIRONMENTS.md).
COPY localRequirements.txt pyproject.toml /tmp/deps/
RUN python -c "import tomllib; p = tomllib.load(open('/tmp/deps/pyproject.toml', 'rb'))['project']; print(*p['dependencies'], *p['optional-dependencies']['speed'], *p['optional-dependencies']['envs'], sep='\n')" > /tmp/deps/project.txt \
 && pip install -r /tmp/deps/localRequirements.txt -r /tmp/deps/project.txt && rm -rf /tmp/deps

# The project itself, from the build context: its dependencies are all there already (--no-deps, so
# nothing resolved above is replaced); pip check proves it.
COPY pyproject.toml README.md /tmp/build/
COPY src /tmp/build/src
RUN pip install --no-deps /tmp/build && pip check && rm -rf /tmp/build

# server.config and logger.ini are mounted here (or come from CONNECTOR_* environment variables).
RUN mkdir -p /home/connector/serverConfig && chown connector:connector /home/connector/serverConfig
USER connector
WORKDIR /home/connector
VOLUME ["/home/connector/serverConfig"]
# 9090: HTTP health and metrics; 8000: the plain TCP probe (tcpProbePort).
EXPOSE 9090 8000

HEALTHCHECK --interval=30s --timeout=10s --start-period=30s --retries=3 CMD ["pyexec-connector", "healthcheck"]
STOPSIGNAL SIGTERM
ENTRYPOINT ["tini", "--", "pyexec-connector"]
