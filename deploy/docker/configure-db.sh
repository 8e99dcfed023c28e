#!/bin/sh
# One-shot job (docker-compose.yml, service fdb-configure): create the
# FoundationDB database the first time, then wait until it is available.
#
#   FDB_CLUSTER_FILE        cluster file written by the fdb service
#   FDB_CONFIGURATION       what `configure new` gets (default: single ssd)
#   FDB_CONFIGURE_ATTEMPTS  tries before giving up (default: 60)
#   FDB_CONFIGURE_DELAY     seconds between tries (default: 2)
#
# Idempotent: on a database that already exists fdbcli answers "Database
# already exists", which counts as success, so re-running the job is harmless.
set -u

cluster_file="${FDB_CLUSTER_FILE:-/var/fdb/fdb.cluster}"
configuration="${FDB_CONFIGURATION:-single ssd}"
attempts="${FDB_CONFIGURE_ATTEMPTS:-60}"
delay="${FDB_CONFIGURE_DELAY:-2}"

log() { echo "configure-db: $*" >&2; }

# retry DESCRIPTION COMMAND...: run COMMAND until it succeeds or attempts run out.
retry() {
    what="$1"
    shift
    n=1
    until "$@"; do
        if [ "$n" -ge "$attempts" ]; then
            log "giving up: $what (after $n attempts)"
            exit 1
        fi
        n=$((n + 1))
        sleep "$delay"
    done
}

cluster_file_present() { [ -s "$cluster_file" ]; }

configure() {
    # $configuration is split into words on purpose: "single ssd" -> two tokens.
    out=$(fdbcli -C "$cluster_file" --timeout 10 --exec "configure new $configuration" 2>&1)
    status=$?
    case "$out" in
        *"Database already exists"*)
            log "database already exists; configuration left as it is"
            return 0
            ;;
    esac
    if [ "$status" -eq 0 ]; then
        log "configured new database: $configuration"
        return 0
    fi
    log "configure failed (exit $status): $out"
    return 1
}

available() {
    out=$(fdbcli -C "$cluster_file" --timeout 10 --exec "status minimal" 2>&1)
    case "$out" in
        *"The database is available"*) return 0 ;;
    esac
    log "waiting: $out"
    return 1
}

retry "cluster file $cluster_file" cluster_file_present
retry "configure new $configuration" configure
retry "database available" available
log "database available"
