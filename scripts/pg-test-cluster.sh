#!/usr/bin/env bash
# A throwaway PostgreSQL cluster on 127.0.0.1 for the tests and bench/ingest_postgres.py,
# from Debian's `postgresql` package (initdb + pg_ctl; no systemd, no change to the
# distribution's own cluster).
#
#   scripts/pg-test-cluster.sh start [DIR] [PORT]   # init if needed, start; prints exports
#   scripts/pg-test-cluster.sh stop  [DIR]          # fast shutdown (the data stays)
#   scripts/pg-test-cluster.sh status [DIR]
#
#   eval "$(scripts/pg-test-cluster.sh start)"      # sets LLM_EXPORTER_TEST_PG_DSN and
#                                                   # LLM_EXPORTER_TEST_PG_DATA
#
# DIR defaults to /tmp/llm-exporter-pg, PORT to 55432 (remembered in DIR for later starts).
# The role `llm_test` (password `llm_test`, CREATEDB) owns the database `llm_test`; tests
# create and drop their own databases with it. Loopback only, scram-sha-256 over TCP.
# Run as root, the server runs as the `postgres` user (PostgreSQL refuses to run as root):
# DIR is then chowned to it, and its parent must be traversable (an empty `mktemp -d` dir
# works as DIR itself).
set -euo pipefail

cmd="${1:-}"
dir="${2:-/tmp/llm-exporter-pg}"
port="${3:-}"

bindir=""
for candidate in "$(pg_config --bindir 2>/dev/null || true)" \
                 $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
  if [ -n "$candidate" ] && [ -x "$candidate/initdb" ] && [ -x "$candidate/pg_ctl" ]; then
    bindir="$candidate"
    break
  fi
done
if [ -z "$bindir" ]; then
  echo "pg-test-cluster: initdb/pg_ctl not found; apt-get install postgresql" >&2
  exit 3
fi

as_owner() {
  if [ "$(id -u)" = 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

pg_ctl_() { as_owner "$bindir/pg_ctl" -D "$dir" "$@"; }

init_cluster() {
  mkdir -p "$dir"
  chmod 700 "$dir"
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$dir"
  local pwfile="$dir.pw"
  (umask 077; printf 'postgres\n' > "$pwfile")
  [ "$(id -u)" = 0 ] && chown postgres:postgres "$pwfile"
  as_owner "$bindir/initdb" -D "$dir" -U postgres --pwfile="$pwfile" -E UTF8 \
    --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256 >"$dir.initdb.log" 2>&1 \
    || { cat "$dir.initdb.log" >&2; rm -f "$pwfile"; exit 1; }
  rm -f "$pwfile" "$dir.initdb.log"
  {
    echo "listen_addresses = '127.0.0.1'"
    echo "port = ${port:-55432}"
    echo "unix_socket_directories = '$dir'"
    echo "max_connections = 200"
  } | as_owner tee -a "$dir/postgresql.conf" >/dev/null
}

psql_() { as_owner "$bindir/psql" -X -q -h "$dir" -p "$(cat "$dir/.port")" -U postgres "$@"; }

case "$cmd" in
  start)
    if [ ! -s "$dir/PG_VERSION" ]; then
      init_cluster
      echo "${port:-55432}" | as_owner tee "$dir/.port" >/dev/null
      fresh=1
    fi
    if ! pg_ctl_ status >/dev/null 2>&1; then
      pg_ctl_ -w -t 60 -l "$dir/server.log" start >/dev/null \
        || { tail -20 "$dir/server.log" >&2; exit 1; }
    fi
    if [ "${fresh:-0}" = 1 ]; then
      psql_ -d postgres -v ON_ERROR_STOP=1 \
        -c "CREATE ROLE llm_test LOGIN CREATEDB PASSWORD 'llm_test'" \
        -c "CREATE DATABASE llm_test OWNER llm_test"
    fi
    p="$(cat "$dir/.port")"
    echo "export LLM_EXPORTER_TEST_PG_DSN='postgresql://llm_test:llm_test@127.0.0.1:$p/llm_test'"
    echo "export LLM_EXPORTER_TEST_PG_DATA='$dir'"
    ;;
  stop)
    if pg_ctl_ status >/dev/null 2>&1; then
      pg_ctl_ -w -t 60 -m fast stop >/dev/null
    fi
    ;;
  status)
    pg_ctl_ status
    ;;
  *)
    echo "usage: $0 start|stop|status [DIR] [PORT]" >&2
    exit 2
    ;;
esac
