# Start/stop a throw-away PostgreSQL cluster on 127.0.0.1 (initdb refuses root: run as postgres).
# Exports COLT_TEST_POSTGRES_URL for the tests.  Usage: source .ci/postgres.sh; start_postgres
PG_DIR=${PG_DIR:-/tmp/colt-ci-pg}

start_postgres() {
  local bin
  # A free port, so a cluster left running elsewhere on this machine does not collide.
  PG_PORT=${PG_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -n 1)
  rm -rf "$PG_DIR"
  mkdir -p "$PG_DIR"
  chown postgres:postgres "$PG_DIR"
  su postgres -s /bin/sh -c "cd / && $bin/initdb -D $PG_DIR/data -A trust -U postgres >/dev/null"
  su postgres -s /bin/sh -c "cd / && $bin/pg_ctl -D $PG_DIR/data -l $PG_DIR/log -w -o '-p $PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c max_connections=200' start >/dev/null"
  su postgres -s /bin/sh -c "cd / && $bin/createdb -h 127.0.0.1 -p $PG_PORT -U postgres colt_test"
  export COLT_TEST_POSTGRES_URL="postgresql://postgres@127.0.0.1:$PG_PORT/colt_test"
  export PG_BIN="$bin"
}

stop_postgres() {
  [ -n "${PG_BIN:-}" ] && su postgres -s /bin/sh -c "cd / && $PG_BIN/pg_ctl -D $PG_DIR/data -m fast stop >/dev/null" || true
}
