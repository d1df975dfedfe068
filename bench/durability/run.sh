#!/usr/bin/env bash
# Durability benchmark: acknowledged rows lost per failover (synchronous_mode off and on) and
# pgbench TPS on the primary (synchronous_mode off / on / quorum), pgvigil and Patroni 4.1.5
# side by side on the same three-host network lab (network namespaces, one etcd member +
# PostgreSQL 15 + agent per host), with the same YAML configuration file. One command; prints
# a table. See bench/README.md.
#
#   bench/durability/run.sh
#
# As root (namespaces, veth, iptables; PostgreSQL and the agents run as postgres). Installs
# Patroni into /opt/pgvigil-bench/venv first if needed (scripts/install-bench-deps.sh).
# About 25 minutes with the defaults; BENCH_RUNS, BENCH_TPS_ROUNDS, BENCH_TPS_SECONDS,
# BENCH_SYSTEMS and BENCH_PHASES shrink it (see crates/bench/src/bin/durability.rs).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
if [[ -d ${CARGO_HOME:-$HOME/.cargo}/bin && :$PATH: != *":${CARGO_HOME:-$HOME/.cargo}/bin:"* ]]; then
    PATH="${CARGO_HOME:-$HOME/.cargo}/bin:$PATH"
fi
[[ $(id -u) -eq 0 ]] || { echo "bench: run as root (network namespaces)" >&2; exit 1; }
scripts/install-bench-deps.sh
cargo build --release -p pgvigil -p pgvigil-bench --bin pgvigil --bin durability
TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
[[ $TARGET_DIR == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
exec "$TARGET_DIR/release/durability"
