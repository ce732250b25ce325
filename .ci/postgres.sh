#!/usr/bin/env bash
# A throw-away PostgreSQL server for the storage tests, on loopback only.
#
#   .ci/postgres.sh start     install PostgreSQL (Debian packages) if missing, start a cluster on
#                             127.0.0.1:$PORT with its own data directory, create a user and a
#                             database, and print `export OPTUNA_CTPE_POSTGRES_URL=...`
#   .ci/postgres.sh restart   stop and start the same cluster (its data is kept)
#   .ci/postgres.sh stop      stop the cluster (the data directory stays until `clean`)
#   .ci/postgres.sh clean     stop the cluster and delete its directory
#   .ci/postgres.sh url       print the URL of the running cluster
#
# Usage in CI:   eval "$(.ci/postgres.sh start)"; pytest ...; .ci/postgres.sh stop
# The URL is also written to $OPTUNA_CTPE_PG_DIR/url. PostgreSQL refuses to run as root, so as
# root the server runs as the `postgres` system user (created by the Debian package).
set -euo pipefail

PORT="${OPTUNA_CTPE_PG_PORT:-55432}"
BASE="${OPTUNA_CTPE_PG_DIR:-/tmp/optuna-ctpe-pg}"
DATA="$BASE/data"
LOG="$BASE/server.log"
DB_USER="ctpe"
DB_PASSWORD="ctpe"
DB_NAME="ctpe"
URL="postgresql+psycopg2://$DB_USER:$DB_PASSWORD@127.0.0.1:$PORT/$DB_NAME"

log() { echo "postgres.sh: $*" >&2; }

pg_bin() {
    local dir
    dir="$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)"
    if [[ -z "$dir" || ! -x "$dir/initdb" ]]; then
        return 1
    fi
    echo "$dir"
}

install_if_missing() {
    if pg_bin >/dev/null; then
        return
    fi
    if [[ "$(id -u)" != 0 ]]; then
        log "PostgreSQL is not installed and this is not root: apt-get install postgresql first."
        exit 1
    fi
    log "installing PostgreSQL from the Debian packages"
    # policy-rc.d or the lack of systemd keeps the packaged cluster from starting; we never use it.
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
}

# Run a command as the server's owner: `postgres` when we are root, ourselves otherwise.
as_owner() {
    if [[ "$(id -u)" == 0 ]]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

is_running() {
    local bin
    bin="$(pg_bin)" || return 1
    [[ -f "$DATA/PG_VERSION" ]] && as_owner "$bin/pg_ctl" -D "$DATA" status >/dev/null 2>&1
}

start_server() {
    local bin
    bin="$(pg_bin)"
    as_owner "$bin/pg_ctl" -D "$DATA" -l "$LOG" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $PORT -k $BASE -c max_connections=200" \
        start >&2
}

cmd_start() {
    install_if_missing
    local bin
    bin="$(pg_bin)"
    if is_running; then
        log "already running on 127.0.0.1:$PORT"
    else
        mkdir -p "$BASE"
        if [[ "$(id -u)" == 0 ]]; then
            chown postgres: "$BASE"
        fi
        chmod 700 "$BASE"
        if [[ ! -f "$DATA/PG_VERSION" ]]; then
            # Local (socket) connections trust the OS user; TCP needs the password.
            as_owner "$bin/initdb" -D "$DATA" -U postgres --auth-local=trust \
                --auth-host=scram-sha-256 -E UTF8 >/dev/null
        fi
        start_server
        local exists
        exists="$(as_owner "$bin/psql" -h "$BASE" -p "$PORT" -U postgres -d postgres -tAc \
            "SELECT 1 FROM pg_roles WHERE rolname = '$DB_USER'")"
        if [[ "$exists" != 1 ]]; then
            as_owner "$bin/psql" -h "$BASE" -p "$PORT" -U postgres -d postgres -q -v ON_ERROR_STOP=1 \
                -c "CREATE ROLE $DB_USER LOGIN PASSWORD '$DB_PASSWORD'" \
                -c "CREATE DATABASE $DB_NAME OWNER $DB_USER" >&2
        fi
    fi
    echo "$URL" >"$BASE/url"
    chmod 644 "$BASE/url"
    log "PostgreSQL on 127.0.0.1:$PORT, data in $DATA, log in $LOG"
    echo "export OPTUNA_CTPE_POSTGRES_URL='$URL'"
}

cmd_stop() {
    local bin
    if ! bin="$(pg_bin)" || ! is_running; then
        log "not running"
        return 0
    fi
    as_owner "$bin/pg_ctl" -D "$DATA" -m fast -w stop >&2
}

case "${1:-}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    restart)
        cmd_stop
        start_server
        ;;
    clean)
        cmd_stop
        rm -rf "$BASE"
        ;;
    url)
        is_running || { log "not running"; exit 1; }
        echo "$URL"
        ;;
    *)
        echo "usage: $0 start|stop|restart|clean|url" >&2
        exit 2
        ;;
esac
