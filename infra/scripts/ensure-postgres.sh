#!/usr/bin/env bash
# Make sure PostgreSQL's server programs (initdb, pg_ctl) are installed, from Debian's packages.
# Idempotent and quiet: does nothing when they are already there. Needs root (or sudo) to install.
# The tests start their own throwaway cluster (tests/servers.py); this script starts nothing, and the
# package's own cluster is left stopped so it does not hold port 5432 or memory for nothing.
set -euo pipefail

have_pg() {
    command -v initdb >/dev/null 2>&1 && command -v pg_ctl >/dev/null 2>&1 && return 0
    # Debian keeps the server programs off PATH, under /usr/lib/postgresql/<major>/bin.
    compgen -G '/usr/lib/postgresql/*/bin/initdb' >/dev/null && compgen -G '/usr/lib/postgresql/*/bin/pg_ctl' >/dev/null
}

if have_pg && id postgres >/dev/null 2>&1; then
    exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { echo "ensure-postgres: need root or sudo to install postgresql" >&2; exit 1; }
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
# policy-rc.d exit 101 stops the package from starting its cluster service during the install
# (there is no init system in CI containers, and we do not want a server on 5432 anyway).
policy=/usr/sbin/policy-rc.d
made_policy=0
if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
    $SUDO chmod +x "$policy"
    made_policy=1
fi
trap '[ "$made_policy" = 1 ] && $SUDO rm -f "$policy"' EXIT

echo "ensure-postgres: installing postgresql from Debian packages" >&2
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends postgresql >/dev/null

have_pg || { echo "ensure-postgres: postgresql installed but initdb/pg_ctl not found" >&2; exit 1; }
