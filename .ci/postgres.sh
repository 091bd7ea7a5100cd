#!/usr/bin/env bash
# A throwaway PostgreSQL server on 127.0.0.1 for the tests: its data, socket and log live in one temp folder.
#
#   bash .ci/postgres.sh run CMD...   start a server, run CMD with S2AGENT_TEST_POSTGRES_URL set, stop it;
#                                     exits with CMD's status (e.g. `bash .ci/postgres.sh run .venv/bin/python -m pytest -q`)
#   env=$(bash .ci/postgres.sh start) && eval "$env"   start one; it prints `export` lines for
#                                     S2AGENT_TEST_POSTGRES_URL and TEST_POSTGRES_DIR (the temp folder)
#   bash .ci/postgres.sh stop [DIR]   stop the server in DIR (default $TEST_POSTGRES_DIR) and delete DIR
#   bash .ci/postgres.sh down [DIR] / up [DIR]   stop the server, keeping its data / start it again on the same
#                                     port (for tests of what clients do while the database is away)
#
# The server trusts local connections (no password), keeps nothing (fsync off) and listens on a free port.
# Its binaries come from PATH or /usr/lib/postgresql/*/bin; when there are none and this runs as root with
# apt-get, the Debian `postgresql` package is installed. initdb refuses to run as root: as root the server
# runs as the `postgres` user (else `nobody`).
set -euo pipefail
shopt -s inherit_errexit  # errexit also inside $(start)

log() { echo "postgres.sh: $*" >&2; }

# The folder holding initdb, pg_ctl, postgres and createdb (not a wrapper's folder: Debian wraps some tools).
pg_bindir() {
    local initdb dir
    if initdb=$(command -v initdb 2>/dev/null); then
        dir=$(dirname "$(readlink -f "$initdb")")
        if [ -x "$dir/pg_ctl" ] && [ -x "$dir/postgres" ]; then
            echo "$dir"
            return
        fi
    fi
    dir=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
    [ -n "$dir" ] && [ -x "$dir/initdb" ] && echo "$dir"
}

ensure_binaries() {
    local bindir
    if bindir=$(pg_bindir) && [ -n "$bindir" ]; then
        echo "$bindir"
        return
    fi
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        log "no PostgreSQL binaries found: installing the postgresql package"
        DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
        bindir=$(pg_bindir) && [ -n "$bindir" ] && { echo "$bindir"; return; }
    fi
    log "no PostgreSQL binaries (initdb) found; install PostgreSQL (e.g. apt-get install postgresql)"
    return 1
}

# Run a command as the server's user: as root that is `postgres` (or `nobody`), else the current user.
as_server_user() {
    if [ "$(id -u)" -eq 0 ]; then
        (cd / && runuser -u "$SERVER_USER" -- "$@")  # from a folder that user can read
    else
        "$@"
    fi
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

start() {
    local bindir dir port options db="s2agent_test" user="postgres"
    bindir=$(ensure_binaries)
    SERVER_USER=$(id -un)
    if [ "$(id -u)" -eq 0 ]; then
        SERVER_USER=postgres
        id postgres >/dev/null 2>&1 || SERVER_USER=nobody
    fi
    dir=$(mktemp -d "${TMPDIR:-/tmp}/s2agent-pg.XXXXXX")
    chmod 700 "$dir"
    [ "$(id -u)" -eq 0 ] && chown "$SERVER_USER" "$dir"
    as_server_user "$bindir/initdb" -D "$dir/data" -U "$user" --auth=trust -E UTF8 --locale=C.UTF-8 >"$dir/initdb.log" 2>&1 || {
        cat "$dir/initdb.log" >&2
        rm -rf "$dir"
        log "initdb failed"
        return 1
    }
    local tries=0
    while :; do
        port=$(free_port)
        options="-k $dir -p $port -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200"
        if as_server_user "$bindir/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 -o "$options" start >/dev/null; then
            echo "$options" >"$dir/options"  # for `up`
            break
        fi
        tries=$((tries + 1))
        if [ "$tries" -ge 3 ]; then
            tail -n 20 "$dir/server.log" >&2 || true
            rm -rf "$dir"
            log "the server did not start"
            return 1
        fi
        log "the server did not start on port $port; trying another"
    done
    as_server_user "$bindir/createdb" -h 127.0.0.1 -p "$port" -U "$user" "$db"
    log "PostgreSQL $("$bindir/postgres" --version | awk '{print $3}') on 127.0.0.1:$port (data in $dir)"
    echo "export S2AGENT_TEST_POSTGRES_URL='postgresql://$user@127.0.0.1:$port/$db'"
    echo "export TEST_POSTGRES_DIR='$dir'"
}

stop() {
    local dir=${1:-${TEST_POSTGRES_DIR:-}} bindir
    if [ -z "$dir" ] || [ ! -d "$dir/data" ]; then
        log "no server folder to stop (pass DIR or set TEST_POSTGRES_DIR)"
        return 1
    fi
    bindir=$(pg_bindir)
    SERVER_USER=$(stat -c %U "$dir/data")
    as_server_user "$bindir/pg_ctl" -D "$dir/data" -m immediate -w stop >/dev/null || log "pg_ctl stop failed"
    rm -rf "$dir"
}

down() {
    local dir=${1:-${TEST_POSTGRES_DIR:-}}
    [ -n "$dir" ] && [ -d "$dir/data" ] || { log "no server folder (pass DIR or set TEST_POSTGRES_DIR)"; return 1; }
    SERVER_USER=$(stat -c %U "$dir/data")
    as_server_user "$(pg_bindir)/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null
}

up() {
    local dir=${1:-${TEST_POSTGRES_DIR:-}}
    [ -n "$dir" ] && [ -f "$dir/options" ] || { log "no server folder (pass DIR or set TEST_POSTGRES_DIR)"; return 1; }
    SERVER_USER=$(stat -c %U "$dir/data")
    as_server_user "$(pg_bindir)/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 -o "$(cat "$dir/options")" start >/dev/null
}

run() {
    [ "$#" -gt 0 ] || { log "usage: postgres.sh run CMD..."; return 2; }
    local env
    env=$(start)  # a failed start stops here (set -e); inside eval "$(...)" it would not
    eval "$env"
    trap 'stop "$TEST_POSTGRES_DIR" || true' EXIT
    local status=0
    "$@" || status=$?
    return "$status"
}

case "${1:-}" in
    start) start ;;
    stop) shift; stop "$@" ;;
    down) shift; down "$@" ;;
    up) shift; up "$@" ;;
    run) shift; run "$@" ;;
    *) log "usage: postgres.sh start | stop [DIR] | down [DIR] | up [DIR] | run CMD..."; exit 2 ;;
esac
