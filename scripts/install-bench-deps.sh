#!/usr/bin/env bash
# Installs what the benchmarks need beyond scripts/install-deps.sh, and only what is missing:
# Patroni 4.1.5 in a virtualenv the postgres user can run (bench/failover starts real Patroni
# agents as postgres, side by side with pgvigil). CI does not run this.
#
#   scripts/install-bench-deps.sh
#
# Idempotent. Debian 12, as root. The virtualenv goes to $PGVIGIL_BENCH_VENV
# (default /opt/pgvigil-bench/venv), world-readable, outside any home directory.
set -euo pipefail

PATRONI_VERSION=4.1.5
VENV=${PGVIGIL_BENCH_VENV:-/opt/pgvigil-bench/venv}
log() { printf 'install-bench-deps: %s\n' "$*"; }
die() { printf 'install-bench-deps: ERROR: %s\n' "$*" >&2; exit 1; }

[[ $(id -u) -eq 0 ]] || die "run as root"
"$(dirname "${BASH_SOURCE[0]}")/install-deps.sh"

patroni_ok() {
    [[ -x $VENV/bin/patroni ]] \
        && [[ $(runuser -u postgres -- "$VENV/bin/patroni" --version 2>/dev/null || true) == "patroni ${PATRONI_VERSION}" ]]
}
if patroni_ok; then
    log "patroni ${PATRONI_VERSION} already in $VENV"
    exit 0
fi
# Debian's own python3 (the postgres user cannot read a pyenv under /root).
PY=/usr/bin/python3
[[ -x $PY ]] || die "$PY not found"
if ! $PY -c 'import ensurepip' >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
fi
[[ -x $VENV/bin/pip ]] || $PY -m venv "$VENV"
"$VENV/bin/pip" install -q "patroni[etcd3]==${PATRONI_VERSION}" psycopg2-binary
chmod -R a+rX "$(dirname "$VENV")"
patroni_ok || die "patroni ${PATRONI_VERSION} does not run as postgres from $VENV"
log "installed patroni ${PATRONI_VERSION} and patronictl into $VENV"
