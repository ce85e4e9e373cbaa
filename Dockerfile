# llm-cost-exporter image. Build from the repository root: docker build -t llm-cost-exporter .
# Pinned base: a rebuild gets the same Python until this line is changed on purpose.
FROM python:3.11.13-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# Non-root user. The ledger directory is created here, owned by that user, so that a named
# volume mounted on it starts with the same owner (Docker copies it on first use).
RUN groupadd --system --gid 10001 exporter \
    && useradd --system --uid 10001 --gid exporter --no-create-home \
       --home-dir /nonexistent --shell /usr/sbin/nologin exporter \
    && mkdir -p /etc/llm-cost-exporter/data \
    && chown exporter:exporter /etc/llm-cost-exporter/data

WORKDIR /src
COPY pyproject.toml README.md ./
COPY exporter ./exporter
# The postgres extra (psycopg, with its own libpq) lets the same image serve either ledger.
RUN pip install --no-cache-dir ".[postgres]" && rm -rf /src/exporter /src/build

WORKDIR /etc/llm-cost-exporter
USER exporter:exporter
EXPOSE 9464

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; r = urllib.request.urlopen('http://127.0.0.1:9464/healthz', timeout=4); sys.exit(0 if r.status == 200 else 1)"]

# The config is mounted at /etc/llm-cost-exporter/config.yaml (see docker-compose.yml).
# Listening on all interfaces is needed inside a container: publish the port on 127.0.0.1
# or put an authenticating proxy in front.
CMD ["llm-cost-exporter", "serve", "--config", "/etc/llm-cost-exporter/config.yaml", \
     "--listen", "0.0.0.0:9464", "--allow-public-listen"]
