#!/usr/bin/env bash
# Client-routing benchmark: direct vs HAProxy vs `pgvigil router` on a real 3-node cluster on
# this machine. One command, about 8 minutes; prints a table. See bench/README.md.
#
#   bench/routing/run.sh
#
# Runs as root (the cluster's PostgreSQL runs as the postgres user, like in the tests). Needs
# etcd, PostgreSQL 15, pgbench and haproxy (scripts/install-deps.sh installs them).
# BENCH_RUNS, BENCH_SECONDS, BENCH_CONNECTS and BENCH_FAILOVERS shrink it for a smoke run.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
if [[ -d ${CARGO_HOME:-$HOME/.cargo}/bin && :$PATH: != *":${CARGO_HOME:-$HOME/.cargo}/bin:"* ]]; then
    PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
for tool in etcd pgbench psql /usr/sbin/haproxy; do
    command -v "$tool" >/dev/null 2>&1 || { echo "bench: $tool not found; run scripts/install-deps.sh" >&2; exit 1; }
done
cargo build --release -p pgvigil -p pgvigilctl -p pgvigil-bench
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
exec "$TARGET_DIR/release/routing"
