#!/usr/bin/env bash
# Native monitoring stack without Docker: the exporter, Prometheus and Alertmanager on
# loopback, with their data under .stack/. Ctrl-C stops all three.
#
#   bash scripts/stack.sh                  # start, print the URLs, wait
#   bash scripts/stack.sh --render-config  # only write the runtime configs and exit
#
# Needs Debian's `prometheus` and `prometheus-alertmanager` packages (or the upstream
# `prometheus` and `alertmanager` binaries on PATH) and the project's .venv (`make run` makes
# it). Grafana is not packaged in Debian: use `docker compose up grafana`, or a Grafana
# installed from Grafana's own packages with grafana/provisioning (point the datasource URL at
# http://127.0.0.1:9090).
#
# Environment: STACK_DIR (default .stack), CONFIG (default examples/config.yaml), and the
# loopback addresses EXPORTER_ADDR (127.0.0.1:9464), PROM_ADDR (127.0.0.1:9090) and
# AM_ADDR (127.0.0.1:9093); EXPORTER_BIN and PYTHON (default: those of .venv).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STACK_DIR="${STACK_DIR:-$ROOT/.stack}"
CONFIG="${CONFIG:-$ROOT/examples/config.yaml}"
EXPORTER_ADDR="${EXPORTER_ADDR:-127.0.0.1:9464}"
PROM_ADDR="${PROM_ADDR:-127.0.0.1:9090}"
AM_ADDR="${AM_ADDR:-127.0.0.1:9093}"
EXPORTER_URL="http://$EXPORTER_ADDR"
SECRETS_DIR="$ROOT/alertmanager/secrets"
EXPORTER_BIN="${EXPORTER_BIN:-$ROOT/.venv/bin/llm-cost-exporter}"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"

render_config() {
    mkdir -p "$STACK_DIR"
    # Prometheus: the repository config with an absolute rules path, so that the copy in
    # .stack/ loads the repository's rules, and the chosen addresses.
    sed -e "s#^  - rules/\*\.yml#  - $ROOT/prometheus/rules/*.yml#" \
        -e "s#\"127.0.0.1:9464\"#\"$EXPORTER_ADDR\"#" -e "s#\"127.0.0.1:9093\"#\"$AM_ADDR\"#" \
        "$ROOT/prometheus/prometheus.yml" > "$STACK_DIR/prometheus.yml"
    # Alertmanager reads *_file paths relative to its working directory and the repository
    # config uses the container paths; point both the secrets and the templates into the
    # repository.
    sed -e "/_file:/s#/etc/alertmanager/secrets/#$SECRETS_DIR/#" \
        -e "s#^  - templates/\*\.tmpl#  - $ROOT/alertmanager/templates/*.tmpl#" \
        "$ROOT/alertmanager/alertmanager.yml" > "$STACK_DIR/alertmanager.yml"
    if ! grep -q "$ROOT/prometheus/rules/" "$STACK_DIR/prometheus.yml" \
        || ! grep -q "$ROOT/alertmanager/templates/" "$STACK_DIR/alertmanager.yml"; then
        echo "stack.sh: could not rewrite the configs (did their layout change?)" >&2
        exit 1
    fi
}

find_bin() {
    local name
    for name in "$@"; do
        if command -v "$name" >/dev/null 2>&1; then
            command -v "$name"
            return 0
        fi
    done
    echo "stack.sh: none of [$*] found; apt-get install prometheus prometheus-alertmanager" >&2
    exit 1
}

# Poll an HTTP URL until it answers 200, for at most 30 s.
wait_http() {
    "$PYTHON" - "$1" <<'EOF'
import sys, time, urllib.request
deadline = time.monotonic() + 30
while True:
    try:
        if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200:
            sys.exit(0)
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"stack.sh: {sys.argv[1]} not ready after 30 s")
    time.sleep(0.2)
EOF
}

render_config
if [[ "${1:-}" == "--render-config" ]]; then
    echo "wrote $STACK_DIR/prometheus.yml and $STACK_DIR/alertmanager.yml"
    exit 0
fi

PROMETHEUS="$(find_bin prometheus)"
ALERTMANAGER="$(find_bin prometheus-alertmanager alertmanager)"
for bin in "$EXPORTER_BIN" "$PYTHON"; do
    [[ -x "$bin" ]] || { echo "stack.sh: $bin missing; run 'make run' once" >&2; exit 1; }
done

for secret in slack_api_url slack_data_science_api_url pagerduty_routing_key; do
    [[ -s "$SECRETS_DIR/$secret" ]] || echo "stack.sh: warning: $SECRETS_DIR/$secret is" \
        "missing, notifications through it will fail (see alertmanager/secrets/README.md)" >&2
done

mkdir -p "$STACK_DIR/prometheus-data" "$STACK_DIR/alertmanager-data"
PIDS=()
# Background jobs of a script ignore SIGINT, so Ctrl-C reaches only this shell: the trap
# terminates the three processes and waits for them.
stop_all() {
    trap - INT TERM EXIT
    echo "stopping..." >&2
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait "${PIDS[@]}" 2>/dev/null || true
}
trap 'stop_all; exit 130' INT TERM
trap stop_all EXIT

"$EXPORTER_BIN" serve --config "$CONFIG" --listen "$EXPORTER_ADDR" >"$STACK_DIR/exporter.log" 2>&1 &
PIDS+=($!)
"$ALERTMANAGER" --config.file="$STACK_DIR/alertmanager.yml" \
    --storage.path="$STACK_DIR/alertmanager-data" --web.listen-address="$AM_ADDR" \
    --web.external-url="http://$AM_ADDR" --cluster.listen-address= \
    >"$STACK_DIR/alertmanager.log" 2>&1 &
PIDS+=($!)
"$PROMETHEUS" --config.file="$STACK_DIR/prometheus.yml" \
    --storage.tsdb.path="$STACK_DIR/prometheus-data" --web.listen-address="$PROM_ADDR" \
    --web.external-url="http://$PROM_ADDR" --rules.alert.resend-delay=1s \
    >"$STACK_DIR/prometheus.log" 2>&1 &
PIDS+=($!)

wait_http "$EXPORTER_URL/healthz"
wait_http "http://$AM_ADDR/-/ready"
wait_http "http://$PROM_ADDR/-/ready"

cat <<EOF
llm-cost-exporter  $EXPORTER_URL  (POST /v1/usage, GET /metrics)
Prometheus         http://$PROM_ADDR  (alerts: http://$PROM_ADDR/alerts)
Alertmanager       http://$AM_ADDR
Grafana            not started: not packaged in Debian (see the header of scripts/stack.sh)
Logs and data in $STACK_DIR. Ctrl-C stops everything.
EOF

# Stop everything as soon as one of the three exits (or on Ctrl-C through the trap).
wait -n "${PIDS[@]}" || true
echo "a process exited; see the logs in $STACK_DIR" >&2
