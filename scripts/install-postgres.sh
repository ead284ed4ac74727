#!/usr/bin/env bash
# Make sure PostgreSQL (15, from Debian) with the pgvector extension is installed and running on
# 127.0.0.1:5432, for the pgvector driver's tests. Idempotent: each step is skipped when its
# result is already there, so a second run only checks.
#
# - PostgreSQL missing: installed from Debian, started, and local connections from 127.0.0.1 set
#   to trust (a test machine's set-up; do not run this on a server you care about).
# - PostgreSQL stopped: started.
# - pgvector missing: Debian 12 does not package it, so Debian's own pgvector source package is
#   taken from the next release (trixie) and built against the installed server
#   (a deb-src entry for trixie on the mirror this machine already uses, then
#   `apt-get source pgvector`, `make`, `make install`).
# Needs root (apt-get, pg_ctlcluster); uses sudo when not root.
set -euo pipefail

PG_VERSION=${PG_VERSION:-15}
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive

log() { echo "install-postgres: $*"; }

apt_updated=""
apt_update() {
    if [ -z "$apt_updated" ]; then
        $SUDO apt-get update -qq
        apt_updated=1
    fi
}

extension_dir() { echo "/usr/share/postgresql/$PG_VERSION/extension"; }

install_server() {
    if [ -x "/usr/lib/postgresql/$PG_VERSION/bin/postgres" ]; then
        return
    fi
    log "installing PostgreSQL $PG_VERSION from Debian"
    apt_update
    $SUDO apt-get install -y -qq "postgresql-$PG_VERSION" postgresql-client >/dev/null
    local hba="/etc/postgresql/$PG_VERSION/main/pg_hba.conf"
    # Tests connect as postgres over 127.0.0.1 without a password.
    $SUDO sed -i '1i host all all 127.0.0.1/32 trust' "$hba"
    $SUDO sed -i '1i local all postgres trust' "$hba"
}

start_server() {
    if pg_isready -q -h 127.0.0.1 -p 5432; then
        return
    fi
    log "starting PostgreSQL $PG_VERSION"
    $SUDO pg_ctlcluster --skip-systemctl-redirect "$PG_VERSION" main start
    for _ in $(seq 1 30); do
        pg_isready -q -h 127.0.0.1 -p 5432 && return
        sleep 1
    done
    log "PostgreSQL did not come up on 127.0.0.1:5432" >&2
    exit 1
}

debian_mirror() {
    # The URI of the machine's own Debian entry (deb822 or one-line format), never a typed host.
    local uri
    uri=$(grep -hE '^URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null \
        | awk '{print $2}' | grep -E '/debian/?$' | head -n 1 || true)
    if [ -z "$uri" ]; then
        uri=$(grep -hE '^deb ' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
            | awk '{print $2}' | grep -E '/debian/?$' | head -n 1 || true)
    fi
    if [ -z "$uri" ]; then
        log "cannot find the machine's Debian mirror in /etc/apt" >&2
        exit 1
    fi
    echo "$uri"
}

install_pgvector() {
    if [ -f "$(extension_dir)/vector.control" ]; then
        return
    fi
    log "building pgvector from Debian's trixie source package"
    local list=/etc/apt/sources.list.d/pgvector-trixie-src.list
    if [ ! -f "$list" ]; then
        echo "deb-src $(debian_mirror) trixie main" | $SUDO tee "$list" >/dev/null
        apt_updated=""
    fi
    apt_update
    $SUDO apt-get install -y -qq dpkg-dev build-essential "postgresql-server-dev-$PG_VERSION" >/dev/null
    local build
    build=$(mktemp -d)
    (
        cd "$build"
        apt-get source -qq pgvector >/dev/null
        cd pgvector-*/
        make -s PG_CONFIG="/usr/lib/postgresql/$PG_VERSION/bin/pg_config" >/dev/null
        $SUDO make -s install PG_CONFIG="/usr/lib/postgresql/$PG_VERSION/bin/pg_config" >/dev/null
    )
    rm -rf "$build"
    if [ ! -f "$(extension_dir)/vector.control" ]; then
        log "pgvector did not install into $(extension_dir)" >&2
        exit 1
    fi
}

install_server
start_server
install_pgvector
log "PostgreSQL $PG_VERSION with pgvector $(grep default_version "$(extension_dir)/vector.control" \
    | cut -d"'" -f2) is ready on 127.0.0.1:5432"
