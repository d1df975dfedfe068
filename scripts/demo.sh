#!/usr/bin/env bash
# A three-node pgvigil cluster on this machine, with etcd and a client router, all on 127.0.0.1.
#
#   scripts/demo.sh up             install dependencies, build, start everything, wait until healthy
#   scripts/demo.sh up --haproxy   the same, with HAProxy instead of `pgvigil router` on 5000/5001/7000
#   scripts/demo.sh up --tls       TLS everywhere with a generated CA (see scripts/demo-tls.sh);
#                                  combines with --haproxy
#   scripts/demo.sh status         show what is running
#   scripts/demo.sh down           stop everything that `up` started and remove .demo/
#
# Everything lives in .demo/ at the repository root (git-ignored): the three Patroni-format
# configurations node1.yml..node3.yml, data directories, logs and PID files. Processes are
# stopped by the PIDs recorded there, never by name. Runs as root (it installs packages and
# starts the agents as the postgres user); as another user it re-executes itself with sudo.
#
# The router in front of the cluster is `pgvigil router .demo/node1.yml` (node1's own file, with
# a `router:` section; see crates/router/README.md), run as root; with --haproxy it is HAProxy
# with the agents' REST health checks (.demo/haproxy.cfg), as for Patroni. Either way:
#
# Ports: etcd clients 2379/22379/32379 and peers 2380/22380/32380; REST API 8008-8010;
# PostgreSQL 5432-5434; router 5000 (primary), 5001 (replicas), 7000 (stats page).
#
# Environment: PGVIGIL_DEMO_TIMEOUT (seconds to wait for a healthy cluster, default 120),
# CARGO_TARGET_DIR (where the release binaries are built, default target/).
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$SCRIPT_DIR/.." && pwd)
DEMO_LINK="$ROOT/.demo"
TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
[[ $TARGET_DIR == /* ]] || TARGET_DIR="$ROOT/$TARGET_DIR"
RELEASE_DIR="$TARGET_DIR/release"
# shellcheck source=scripts/demo-tls.sh
source "$SCRIPT_DIR/demo-tls.sh"
TIMEOUT="${PGVIGIL_DEMO_TIMEOUT:-120}"

NODES=(1 2 3)
rest_port() { echo $((8007 + $1)); }
pg_port() { echo $((5431 + $1)); }
etcd_client_port() { case $1 in 1) echo 2379 ;; 2) echo 22379 ;; 3) echo 32379 ;; esac; }
etcd_peer_port() { case $1 in 1) echo 2380 ;; 2) echo 22380 ;; 3) echo 32380 ;; esac; }
# The client router's ports, for `pgvigil router` and HAProxy alike.
PRIMARY_PORT=5000
REPLICAS_PORT=5001
STATS_PORT=7000
# Which router `up` starts: router (`pgvigil router`, the default) or haproxy (`up --haproxy`).
PROXY=router

say() { printf 'demo: %s\n' "$*"; }
proxy_label() { if [[ $PROXY == haproxy ]]; then echo HAProxy; else echo "pgvigil router"; fi; }
proxy_label_the() { if [[ $PROXY == haproxy ]]; then echo HAProxy; else echo "the pgvigil router"; fi; }
warn() { printf 'demo: %s\n' "$*" >&2; }
die() { printf 'demo: ERROR: %s\n' "$*" >&2; exit 1; }

prepend_path() { [[ -d $1 && :$PATH: != *:"$1":* ]] && PATH="$1:$PATH"; return 0; }
prepend_path "${CARGO_HOME:-$HOME/.cargo}/bin"
prepend_path "${PYENV_ROOT:-$HOME/.pyenv}/bin"
prepend_path "${PYENV_ROOT:-$HOME/.pyenv}/shims"
export PATH

# The real directory behind .demo (a symlink when the repository is not reachable by postgres).
demo_dir() {
    if [[ -L $DEMO_LINK ]]; then readlink -f "$DEMO_LINK"; else printf '%s\n' "$DEMO_LINK"; fi
}
demo_exists() { [[ -e $DEMO_LINK || -L $DEMO_LINK ]]; }

# Prefix that runs a command as postgres with a clean environment (exec's, so PIDs are kept).
AS_POSTGRES=(setpriv --reuid=postgres --regid=postgres --init-groups --reset-env env LANG=C.UTF-8)

# ---------------------------------------------------------------------------------------------
# Processes: started detached, PID written by the process itself before it execs the program,
# so the recorded PID is the program's own.

# spawn PIDFILE LOGFILE COMMAND...
spawn() {
    local pidfile=$1 logfile=$2
    shift 2
    rm -f "$pidfile"
    # shellcheck disable=SC2016 # $$ and "$@" are for the inner shell
    setsid bash -c 'echo $$ >"$0"; exec "$@"' "$pidfile" "$@" </dev/null >>"$logfile" 2>&1 &
    local i
    for ((i = 0; i < 50; i++)); do
        [[ -s $pidfile ]] && return 0
        sleep 0.1
    done
    die "could not start: $* (no PID in $pidfile)"
}

# alive PID: the process exists and is not a zombie.
alive() {
    local pid=$1 stat
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat%% *} != Z ]]
}

cmdline() { tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null || true; }

read_pid() {
    if [[ -s $1 ]]; then head -n1 "$1" | tr -dc '0-9'; fi
    return 0
}

# pid_if_ours PIDFILE EXPECT: prints the PID if that process is alive and its command line
# contains EXPECT (guards against a PID reused by an unrelated process).
pid_if_ours() {
    local pid
    pid=$(read_pid "$1")
    [[ -n $pid ]] && alive "$pid" || return 1
    [[ $(cmdline "$pid") == *"$2"* ]] || return 1
    printf '%s\n' "$pid"
}

# stop_pids SIGNAL TIMEOUT LABEL PID...: signal, wait up to TIMEOUT s, then SIGKILL.
stop_pids() {
    local sig=$1 timeout=$2 label=$3
    shift 3
    (($#)) || return 0
    local pid left=() deadline=$((SECONDS + timeout))
    say "stopping $label (SIG$sig to PID $*)"
    for pid in "$@"; do kill "-$sig" "$pid" 2>/dev/null || true; done
    while :; do
        left=()
        for pid in "$@"; do alive "$pid" && left+=("$pid"); done
        ((${#left[@]})) || return 0
        ((SECONDS < deadline)) || break
        sleep 0.2
    done
    warn "$label: PID ${left[*]} still running after ${timeout}s; sending SIGKILL"
    for pid in "${left[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
    deadline=$((SECONDS + 10))
    while ((SECONDS < deadline)); do
        left=()
        for pid in "$@"; do alive "$pid" && left+=("$pid"); done
        ((${#left[@]})) || return 0
        sleep 0.2
    done
    warn "$label: PID ${left[*]} survived SIGKILL"
    return 1
}

# The postmaster of a data directory: first line of postmaster.pid, if that process is a
# running postgres whose working directory is that data directory.
postmaster_pid() {
    local data=$1 pid
    pid=$(read_pid "$data/postmaster.pid")
    [[ -n $pid ]] && alive "$pid" || return 1
    [[ $(readlink -f "/proc/$pid/cwd" 2>/dev/null) == "$(readlink -f "$data")" ]] || return 1
    printf '%s\n' "$pid"
}

# ---------------------------------------------------------------------------------------------
# REST / cluster state (parsed with python3, which Patroni needs anyway).

PY_CLUSTER_SUMMARY='
import json, sys
d = json.load(sys.stdin)
print("  %-8s %-14s %-18s %-16s %-3s %s" % ("member", "role", "state", "host", "TL", "lag"))
for m in d.get("members", []):
    host = "%s:%s" % (m.get("host", "?"), m.get("port", "?"))
    lag = m.get("lag", m.get("receive_lag", ""))
    print("  %-8s %-14s %-18s %-16s %-3s %s" % (m.get("name"), m.get("role"), m.get("state"), host,
                                               m.get("timeline", ""), lag))
'
# Exit 0 when there is a running leader and at least two streaming/running replicas.
PY_CLUSTER_READY='
import json, sys
d = json.load(sys.stdin)
ms = d.get("members", [])
leaders = [m for m in ms if m.get("role") in ("leader", "primary", "master", "standby_leader")
           and m.get("state") == "running"]
replicas = [m for m in ms if m.get("role") in ("replica", "sync_standby", "quorum_standby")
            and m.get("state") in ("streaming", "running")]
print(", ".join("%s %s/%s" % (m.get("name"), m.get("role"), m.get("state")) for m in ms) or "no members yet")
sys.exit(0 if len(leaders) == 1 and len(replicas) >= 2 else 1)
'

# The router's /stats.json: where each port goes, and etcd's status.
PY_ROUTER_SUMMARY='
import json, sys
d = json.load(sys.stdin)
listen = d.get("listen", {})
ports = d.get("ports", {})
def conns(port):
    p = ports.get(port, {})
    return "%s active, %s accepted" % (p.get("active", 0), p.get("accepted", 0))
if d.get("primary"):
    where = "%s (%s)" % (d["primary"], d.get("primary_address") or "?")
else:
    where = "refused: %s" % (d.get("no_primary_reason") or "no primary")
print("  %-9s %-16s -> %s; %s" % ("primary", listen.get("primary", "?"), where, conns("primary")))
targets = d.get("read_targets") or []
if targets:
    where = ", ".join(targets) + (" (the primary: no replica qualifies)" if d.get("reads_on_primary") else "")
else:
    where = "refused: %s" % (d.get("no_replica_reason") or "no replica")
print("  %-9s %-16s -> %s; %s" % ("replicas", listen.get("replicas", "?"), where, conns("replicas")))
etcd = d.get("etcd", {})
print("  etcd: %s%s" % (etcd.get("status", "?"), (" (" + etcd["message"] + ")") if etcd.get("message") else ""))
'

# cluster_json: /cluster from the first node that answers.
cluster_json() {
    local n out curl_args
    mapfile -t curl_args < <(tls_curl_args "$(demo_dir)")
    for n in "${NODES[@]}"; do
        if out=$(curl -fsS "${curl_args[@]}" --max-time 2 "$(tls_scheme)://127.0.0.1:$(rest_port "$n")/cluster" 2>/dev/null) && [[ -n $out ]]; then
            printf '%s\n' "$out"
            return 0
        fi
    done
    return 1
}

print_cluster() {
    local json
    if json=$(cluster_json); then
        python3 -c "$PY_CLUSTER_SUMMARY" <<<"$json" || printf '%s\n' "$json"
    else
        echo "  (no REST API answers on ports $(rest_port 1)-$(rest_port 3))"
    fi
}

show_logs() {
    local d f
    d=$(demo_dir)
    [[ -d $d ]] || return 0
    echo
    echo "==================== log tails ($d) ===================="
    for f in "$d"/etcd/etcd*.log; do
        [[ -f $f ]] || continue
        echo "---- ${f#"$d"/} (last 5 lines) ----"
        tail -n 5 "$f"
    done
    for f in "$d"/router.log "$d"/haproxy.log "$d"/node*/pgvigil.log; do
        [[ -f $f ]] || continue
        echo "---- ${f#"$d"/} (last 40 lines) ----"
        tail -n 40 "$f"
    done
    echo "========================================================"
}

# ---------------------------------------------------------------------------------------------

check_ports() {
    local busy=() spec port what users
    local specs=()
    for n in "${NODES[@]}"; do
        specs+=("$(etcd_client_port "$n"):etcd$n client" "$(etcd_peer_port "$n"):etcd$n peer"
            "$(rest_port "$n"):node$n REST API" "$(pg_port "$n"):node$n PostgreSQL")
    done
    specs+=("$PRIMARY_PORT:$(proxy_label) primary" "$REPLICAS_PORT:$(proxy_label) replicas" "$STATS_PORT:$(proxy_label) stats")
    for spec in "${specs[@]}"; do
        port=${spec%%:*}
        what=${spec#*:}
        if [[ -n $(ss -Hltn "( sport = :$port )" 2>/dev/null) ]]; then
            users=$(ss -Hltnp "( sport = :$port )" 2>/dev/null | grep -o 'users:.*' | head -n1 || true)
            busy+=("port $port ($what) is already in use${users:+ by $users}")
        fi
    done
    if ((${#busy[@]})); then
        printf 'demo: ERROR: %s\n' "${busy[@]}" >&2
        if printf '%s\n' "${busy[@]}" | grep -q 'port 5432 '; then
            warn "hint: a Debian 'main' cluster may hold 5432 (see pg_lsclusters; pg_ctlcluster 15 main stop)"
        fi
        die "free these ports (or run scripts/demo.sh down if an earlier demo still runs) and retry"
    fi
}

pg_bin_dir() {
    local d
    for d in /usr/lib/postgresql/15/bin /usr/lib/postgresql/*/bin; do
        [[ -x $d/pg_ctl ]] && { printf '%s\n' "$d"; return 0; }
    done
    die "no PostgreSQL server binaries found under /usr/lib/postgresql"
}

gen_password() { head -c 48 /dev/urandom | base64 | tr -dc 'A-Za-z0-9' | cut -c1-24; }

# Picks where the demo's files go: .demo itself, or (when postgres cannot reach the repository,
# e.g. a clone under /root, or the path is too long for a Unix socket) a directory under /tmp
# that .demo links to. Prints the real directory.
make_demo_dir() {
    local d=$DEMO_LINK sock
    sock="$d/node3/run/.s.PGSQL.$(pg_port 3)"
    if ! setpriv --reuid=postgres --regid=postgres --init-groups test -x "$ROOT" 2>/dev/null || ((${#sock} > 107)); then
        d=$(mktemp -d /tmp/pgvigil-demo.XXXXXX)
        chmod 0755 "$d"
        ln -s "$d" "$DEMO_LINK"
        warn "the postgres user cannot use $ROOT (permissions or path length): files go to $d (.demo links there)" >&2
    else
        mkdir "$d"
    fi
    chown postgres:postgres "$d"
    printf '%s\n' "$d"
}

write_node_config() {
    local n=$1 d=$2 bindir=$3 su_pw=$4 repl_pw=$5
    local f="$d/node$n.yml"
    cat >"$f" <<EOF
# pgvigil demo, member node$n. Patroni format: \`patroni $f\` would accept this file too.
scope: demo
namespace: /service
name: node$n

restapi:
  listen: 127.0.0.1:$(rest_port "$n")
  connect_address: 127.0.0.1:$(rest_port "$n")
$(tls_yaml_restapi "$n" "$d")

etcd3:
  hosts:
  - 127.0.0.1:$(etcd_client_port 1)
  - 127.0.0.1:$(etcd_client_port 2)
  - 127.0.0.1:$(etcd_client_port 3)
$(tls_yaml_etcd "$n" "$d")

bootstrap:
  # Written to the DCS \`config\` key by the member that initializes the cluster.
  dcs:
    ttl: 30
    loop_wait: 10
    retry_timeout: 10
    maximum_lag_on_failover: 1048576
    postgresql:
      use_pg_rewind: true
  initdb:
  - encoding: UTF8
  - data-checksums

postgresql:
  listen: 127.0.0.1:$(pg_port "$n")
  connect_address: 127.0.0.1:$(pg_port "$n")
  data_dir: $d/node$n/data
  bin_dir: $bindir
  pgpass: $d/node$n/pgpass
  authentication:
    superuser:
      username: postgres
      password: '$su_pw'
$(tls_yaml_role "$d" superuser verify-full)
    replication:
      username: replicator
      password: '$repl_pw'
$(tls_yaml_role "$d" replication verify-ca)
  parameters:
    unix_socket_directories: '$d/node$n/run'
$(tls_yaml_parameters "$n" "$d")
  # md5 also accepts SCRAM-hashed passwords (PostgreSQL 15 stores scram-sha-256 by default).
  pg_hba:
  - local all all peer
$(tls_yaml_hba)
EOF
    # Without TLS the fragments are empty: drop the blank lines they leave inside sections.
    sed -i '/^$/{N;/^\n\( \|$\)/D}' "$f"
    if [[ $PROXY == router && $n == 1 ]]; then
        cat >>"$f" <<EOF

# For \`pgvigil router node1.yml\` (the agent and Patroni ignore this section). The router also
# reads scope, namespace and etcd3 above, and follows the leader through etcd; see
# crates/router/README.md in the pgvigil repository.
router:
  primary_listen: 127.0.0.1:$PRIMARY_PORT    # read-write: the running primary holding the leader key
  replicas_listen: 127.0.0.1:$REPLICAS_PORT   # read-only: streaming replicas, round-robin
  stats_listen: 127.0.0.1:$STATS_PORT      # HTML page /, JSON /stats.json, Prometheus /metrics
EOF
    fi
    chown postgres:postgres "$f"
    chmod 0640 "$f"
}

write_haproxy_config() {
    local d=$1 f="$1/haproxy.cfg" n
    {
        cat <<EOF
# HAProxy for the pgvigil demo: routes by the agents' REST health checks, like for Patroni.
# Server state changes are printed on stderr (haproxy -db), which goes to haproxy.log.
global
    maxconn 200

defaults
    mode tcp
    retries 2
    timeout client 30m
    timeout connect 4s
    timeout server 30m
    timeout check 5s

listen stats
    mode http
    bind 127.0.0.1:$STATS_PORT
    stats enable
    stats uri /
    stats refresh 5s

listen primary
    bind 127.0.0.1:$PRIMARY_PORT
    option httpchk OPTIONS /primary
    http-check expect status 200
    default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions
EOF
        for n in "${NODES[@]}"; do
            echo "    server node$n 127.0.0.1:$(pg_port "$n") maxconn 100 check port $(rest_port "$n")$(tls_haproxy_check "$d")"
        done
        cat <<EOF

listen replicas
    bind 127.0.0.1:$REPLICAS_PORT
    balance roundrobin
    option httpchk OPTIONS /replica
    http-check expect status 200
    default-server inter 1s fall 2 rise 1 on-marked-down shutdown-sessions
EOF
        for n in "${NODES[@]}"; do
            echo "    server node$n 127.0.0.1:$(pg_port "$n") maxconn 100 check port $(rest_port "$n")$(tls_haproxy_check "$d")"
        done
    } >"$f"
}

etcd_endpoints() {
    local n eps=()
    for n in "${NODES[@]}"; do eps+=("$(tls_scheme)://127.0.0.1:$(etcd_client_port "$n")"); done
    (IFS=,; printf '%s\n' "${eps[*]}")
}

start_etcd() {
    local d=$1 n initial=() cluster client peer tls_args etcdctl_args
    mkdir -p "$d/etcd"
    mapfile -t tls_args < <(tls_etcd_args "$d")
    mapfile -t etcdctl_args < <(tls_etcdctl_args "$d")
    for n in "${NODES[@]}"; do initial+=("etcd$n=http://127.0.0.1:$(etcd_peer_port "$n")"); done
    cluster=$(IFS=,; printf '%s' "${initial[*]}")
    for n in "${NODES[@]}"; do
        client="$(tls_scheme)://127.0.0.1:$(etcd_client_port "$n")"
        peer="http://127.0.0.1:$(etcd_peer_port "$n")"
        spawn "$d/etcd/etcd$n.pid" "$d/etcd/etcd$n.log" \
            etcd --name "etcd$n" --data-dir "$d/etcd/etcd$n.data" \
            --listen-client-urls "$client" --advertise-client-urls "$client" \
            --listen-peer-urls "$peer" --initial-advertise-peer-urls "$peer" \
            --initial-cluster "$cluster" --initial-cluster-token pgvigil-demo \
            --initial-cluster-state new --pre-vote \
            --logger zap --log-outputs stderr "${tls_args[@]}"
        say "started etcd$n (PID $(read_pid "$d/etcd/etcd$n.pid"), client $client)"
    done
    local deadline=$((SECONDS + 30))
    until ETCDCTL_API=3 etcdctl "${etcdctl_args[@]}" --endpoints="$(etcd_endpoints)" --command-timeout=2s endpoint health >/dev/null 2>&1; do
        ((SECONDS < deadline)) || {
            ETCDCTL_API=3 etcdctl "${etcdctl_args[@]}" --endpoints="$(etcd_endpoints)" --command-timeout=2s endpoint health || true
            fail "etcd did not become healthy within 30 s"
        }
        for n in "${NODES[@]}"; do
            pid_if_ours "$d/etcd/etcd$n.pid" "--name etcd$n" >/dev/null || fail "etcd$n exited during start-up"
        done
        sleep 0.5
    done
    say "etcd is healthy ($(etcd_endpoints))"
}

start_agents() {
    local d=$1 n
    for n in "${NODES[@]}"; do
        spawn "$d/node$n/pgvigil.pid" "$d/node$n/pgvigil.log" "${AS_POSTGRES[@]}" "$d/bin/pgvigil" "$d/node$n.yml"
        say "started pgvigil node$n as postgres (PID $(read_pid "$d/node$n/pgvigil.pid"), log ${d}/node$n/pgvigil.log)"
    done
}

start_haproxy() {
    local d=$1 out
    write_haproxy_config "$d"
    out=$(haproxy -c -f "$d/haproxy.cfg" 2>&1) || { printf '%s\n' "$out" >&2; fail "haproxy rejects $d/haproxy.cfg"; }
    spawn "$d/haproxy.pid" "$d/haproxy.log" haproxy -db -f "$d/haproxy.cfg"
    sleep 0.5
    pid_if_ours "$d/haproxy.pid" "$d/haproxy.cfg" >/dev/null || fail "haproxy exited right after starting"
    say "started haproxy (PID $(read_pid "$d/haproxy.pid")): primary 127.0.0.1:$PRIMARY_PORT, replicas 127.0.0.1:$REPLICAS_PORT, stats http://127.0.0.1:$STATS_PORT/"
}

# proxy_pid DIR router|haproxy: the PID of that router, if it runs.
proxy_pid() {
    case $2 in
        router) pid_if_ours "$1/router.pid" "router $1/node1.yml" ;;
        haproxy) pid_if_ours "$1/haproxy.pid" "$1/haproxy.cfg" ;;
        *) return 1 ;;
    esac
}

# `pgvigil router node1.yml` as root, with a clean environment (it reads PATRONI_* variables).
start_router() {
    local d=$1 deadline
    spawn "$d/router.pid" "$d/router.log" env -i LANG=C.UTF-8 "$d/bin/pgvigil" router "$d/node1.yml"
    deadline=$((SECONDS + 15))
    until curl -fsS --max-time 2 -o /dev/null "http://127.0.0.1:$STATS_PORT/stats.json" 2>/dev/null; do
        pid_if_ours "$d/router.pid" "router $d/node1.yml" >/dev/null || fail "pgvigil router exited right after starting (see $d/router.log)"
        ((SECONDS < deadline)) || fail "pgvigil router: no stats page on 127.0.0.1:$STATS_PORT within 15 s (see $d/router.log)"
        sleep 0.2
    done
    say "started pgvigil router (PID $(read_pid "$d/router.pid"), log $d/router.log): primary 127.0.0.1:$PRIMARY_PORT, replicas 127.0.0.1:$REPLICAS_PORT, stats http://127.0.0.1:$STATS_PORT/"
}

wait_for_cluster() {
    local d=$1 deadline=$((SECONDS + TIMEOUT)) json line last="" n
    say "waiting up to ${TIMEOUT}s for a leader and two streaming replicas"
    while :; do
        for n in "${NODES[@]}"; do
            pid_if_ours "$d/node$n/pgvigil.pid" "$d/node$n.yml" >/dev/null || fail "pgvigil node$n exited (see $d/node$n/pgvigil.log)"
        done
        if json=$(cluster_json); then
            if line=$(python3 -c "$PY_CLUSTER_READY" <<<"$json"); then
                say "cluster ready: $line"
                return 0
            fi
        else
            line="REST API not answering yet"
        fi
        if [[ $line != "$last" ]]; then
            say "  ... $line"
            last=$line
        fi
        ((SECONDS < deadline)) || fail "no healthy cluster after ${TIMEOUT}s (last seen: $line)"
        sleep 1
    done
}

# psql through the router: the primary port must reach a primary, the replica port a replica.
check_routes() {
    local d=$1 pw=$2 deadline=$((SECONDS + 20)) p r tls
    tls=$(tls_libpq "$d")
    while :; do
        proxy_pid "$d" "$PROXY" >/dev/null || fail "$(proxy_label) is no longer running (see $d/$PROXY.log)"
        p=$(PGPASSWORD=$pw psql "host=127.0.0.1 port=$PRIMARY_PORT user=postgres dbname=postgres connect_timeout=3$tls" -XAtqc 'select pg_is_in_recovery()' 2>/dev/null || true)
        r=$(PGPASSWORD=$pw psql "host=127.0.0.1 port=$REPLICAS_PORT user=postgres dbname=postgres connect_timeout=3$tls" -XAtqc 'select pg_is_in_recovery()' 2>/dev/null || true)
        if [[ $p == f && $r == t ]]; then
            say "$(proxy_label) routes: $PRIMARY_PORT -> primary, $REPLICAS_PORT -> replica"
            return 0
        fi
        ((SECONDS < deadline)) || fail "$(proxy_label) does not route as expected within 20 s (port $PRIMARY_PORT in recovery: '${p:-no answer}', port $REPLICAS_PORT in recovery: '${r:-no answer}')"
        sleep 1
    done
}

# Once `up` has created .demo, any failing exit shows the log tails (once, from the main shell).
UP_STARTED=0
on_exit() {
    local rc=$?
    if ((rc != 0 && UP_STARTED)); then
        show_logs >&2
        warn "'scripts/demo.sh up' failed; what it started is left running for inspection."
        warn "'scripts/demo.sh down' stops all of it and removes .demo."
    fi
}
fail() {
    warn "ERROR: $*"
    exit 1
}

cmd_up() {
    if demo_exists; then
        die ".demo already exists (a demo is set up or was left behind): run 'scripts/demo.sh down' first"
    fi
    say "installing dependencies (scripts/install-deps.sh)"
    "$SCRIPT_DIR/install-deps.sh"
    check_ports
    say "building release binaries (cargo build --release -p pgvigil -p pgvigilctl)"
    (cd "$ROOT" && cargo build --release -p pgvigil -p pgvigilctl) \
        || die "the release build failed (errors above); nothing was started"
    [[ -x $RELEASE_DIR/pgvigil ]] || die "$RELEASE_DIR/pgvigil was not built"
    check_ports # again: the build can take minutes

    local d bindir su_pw repl_pw n
    bindir=$(pg_bin_dir)
    d=$(make_demo_dir)
    UP_STARTED=1
    trap on_exit EXIT
    trap 'fail "interrupted"' INT TERM
    mkdir -p "$d/bin"
    install -m 0755 "$RELEASE_DIR/pgvigil" "$d/bin/pgvigil"
    [[ -x $RELEASE_DIR/pgvigilctl ]] && install -m 0755 "$RELEASE_DIR/pgvigilctl" "$d/bin/pgvigilctl"
    for n in "${NODES[@]}"; do
        install -d -o postgres -g postgres -m 0750 "$d/node$n" "$d/node$n/run"
    done
    su_pw=$(gen_password)
    repl_pw=$(gen_password)
    umask 077
    printf 'export PGPASSWORD=%s\n# replication user: replicator / %s\n' "$su_pw" "$repl_pw" >"$d/credentials.env"
    umask 022
    printf '%s\n' "$PROXY" >"$d/proxy" # which router runs, for status
    printf '%s\n' "$TLS" >"$d/tls"
    tls_make_pki "$d"
    local out
    for n in "${NODES[@]}"; do
        write_node_config "$n" "$d" "$bindir" "$su_pw" "$repl_pw"
        out=$("${AS_POSTGRES[@]}" "$d/bin/pgvigil" --validate-config "$d/node$n.yml" 2>&1) \
            || { printf '%s\n' "$out" >&2; fail "pgvigil rejects $d/node$n.yml"; }
    done
    if [[ $PROXY == router ]]; then
        out=$(env -i LANG=C.UTF-8 "$d/bin/pgvigil" router --validate-config "$d/node1.yml" 2>&1) \
            || { printf '%s\n' "$out" >&2; fail "pgvigil router rejects $d/node1.yml"; }
        say "wrote $d/node1.yml (with the router: section), node2.yml, node3.yml (Patroni format)"
    else
        say "wrote $d/node1.yml, node2.yml, node3.yml (Patroni format)"
    fi

    start_etcd "$d"
    start_agents "$d"
    if [[ $PROXY == router ]]; then start_router "$d"; else start_haproxy "$d"; fi
    wait_for_cluster "$d"
    check_routes "$d" "$su_pw"
    trap - INT TERM
    UP_STARTED=0

    local rel_demo=.demo rel_bin via stats tls curl_tls="" tls_note=""
    rel_bin=${RELEASE_DIR#"$ROOT"/}
    tls=$(tls_libpq "$rel_demo")
    if ((TLS)); then
        curl_tls="--cacert $rel_demo/pki/ca.crt --cert $rel_demo/pki/client.crt --key $rel_demo/pki/client.key "
        tls_note="
TLS everywhere (CA and certificates in $rel_demo/pki): etcd wants client certificates, the REST
APIs are HTTPS with verify_client: required, PostgreSQL takes TCP connections only with TLS and
a client certificate (hostssl ... clientcert=verify-ca); the configurations show the keys.
"
    fi
    if [[ $PROXY == router ]]; then
        via="Ports $PRIMARY_PORT and $REPLICAS_PORT go through the pgvigil router ($rel_demo/bin/pgvigil router $rel_demo/node1.yml,
which follows the leader through etcd; the other way is 'scripts/demo.sh up --haproxy')."
        stats="Router stats: http://127.0.0.1:$STATS_PORT/  (JSON: /stats.json, Prometheus: /metrics)"
    else
        via="Ports $PRIMARY_PORT and $REPLICAS_PORT go through HAProxy ($rel_demo/haproxy.cfg, health checks on the REST API)."
        stats="HAProxy stats: http://127.0.0.1:$STATS_PORT/"
    fi
    cat <<EOF

pgvigil demo cluster 'demo' is up:
$(print_cluster)
$tls_note
$via

Connect (from the repository root; the password is in $rel_demo/credentials.env):
  export PGPASSWORD=$su_pw
  psql "host=127.0.0.1 port=$PRIMARY_PORT user=postgres$tls"     # read-write, the primary via $(proxy_label_the)
  psql "host=127.0.0.1 port=$REPLICAS_PORT user=postgres$tls"     # read-only, replicas round-robin
  psql "host=127.0.0.1 port=5432 user=postgres$tls"     # node1 directly (node2: 5433, node3: 5434)

Inspect:
  $rel_bin/pgvigilctl -c $rel_demo/node1.yml list
  patronictl -c $rel_demo/node1.yml list
  curl -s $curl_tls$(tls_scheme)://127.0.0.1:8008/cluster       # REST API: node1 8008, node2 8009, node3 8010
  $stats
  Logs: $rel_demo/node1/pgvigil.log .. node3, $rel_demo/etcd/etcd1.log .., $rel_demo/$PROXY.log
  scripts/demo.sh status

Stop and remove everything: scripts/demo.sh down
EOF
}

cmd_down() {
    if ! demo_exists; then
        say "no .demo: nothing to stop"
        return 0
    fi
    local d n pid pids rc=0
    d=$(demo_dir)

    # The router first (either one; both PID files are checked). On SIGTERM `pgvigil router`
    # closes its listeners and gives open connections router.shutdown_timeout (10 s) to finish.
    pids=()
    if pid=$(proxy_pid "$d" router); then pids+=("$pid"); fi
    stop_pids TERM 20 "pgvigil router" "${pids[@]}" || rc=1

    pids=()
    if pid=$(proxy_pid "$d" haproxy); then pids+=("$pid"); fi
    stop_pids TERM 10 haproxy "${pids[@]}" || rc=1

    pids=()
    for n in "${NODES[@]}"; do
        if pid=$(pid_if_ours "$d/node$n/pgvigil.pid" "$d/node$n.yml"); then pids+=("$pid"); fi
    done
    # The agents stop PostgreSQL themselves on SIGTERM; give them time for that.
    stop_pids TERM 60 "pgvigil agents" "${pids[@]}" || rc=1

    pids=()
    for n in "${NODES[@]}"; do
        if pid=$(postmaster_pid "$d/node$n/data"); then pids+=("$pid"); fi
    done
    if ((${#pids[@]})); then
        # SIGINT = fast shutdown; stop_pids escalates to SIGKILL.
        stop_pids INT 30 "leftover postmasters" "${pids[@]}" || rc=1
    fi

    pids=()
    for n in "${NODES[@]}"; do
        if pid=$(pid_if_ours "$d/etcd/etcd$n.pid" "--name etcd$n"); then pids+=("$pid"); fi
    done
    stop_pids TERM 15 etcd "${pids[@]}" || rc=1

    if ((rc)); then
        die "some processes could not be stopped; $d is kept"
    fi
    if [[ -L $DEMO_LINK ]]; then
        case $d in
            /tmp/pgvigil-demo.*) rm -rf -- "$d" ;;
            *) warn "not removing $d (unexpected target of .demo)" ;;
        esac
        rm -f -- "$DEMO_LINK"
    else
        rm -rf -- "$DEMO_LINK"
    fi
    say "stopped everything and removed .demo"
}

cmd_status() {
    if ! demo_exists; then
        say "not set up (no .demo)"
        return 3
    fi
    local d n pid down=0
    d=$(demo_dir)
    TLS=$(cat "$d/tls" 2>/dev/null || echo 0)
    echo "Processes (from the PID files in $d):"
    show() { # LABEL PIDFILE EXPECT
        if pid=$(pid_if_ours "$2" "$3"); then
            printf '  %-22s running  PID %s\n' "$1" "$pid"
        else
            printf '  %-22s stopped%s\n' "$1" "$([[ -s $2 ]] && echo " (recorded PID $(read_pid "$2"))")"
            down=1
        fi
    }
    for n in "${NODES[@]}"; do show "etcd$n" "$d/etcd/etcd$n.pid" "--name etcd$n"; done
    for n in "${NODES[@]}"; do show "pgvigil node$n" "$d/node$n/pgvigil.pid" "$d/node$n.yml"; done
    for n in "${NODES[@]}"; do
        if pid=$(postmaster_pid "$d/node$n/data"); then
            printf '  %-22s running  PID %s (port %s)\n' "postgres node$n" "$pid" "$(pg_port "$n")"
        else
            printf '  %-22s stopped\n' "postgres node$n"
        fi
    done
    local proxy
    proxy=$(cat "$d/proxy" 2>/dev/null || true)
    if [[ $proxy != router && $proxy != haproxy ]]; then # a .demo from before the router
        if [[ -e $d/router.pid ]]; then proxy=router; else proxy=haproxy; fi
    fi
    if [[ $proxy == router ]]; then
        show "pgvigil router" "$d/router.pid" "router $d/node1.yml"
    else
        show haproxy "$d/haproxy.pid" "$d/haproxy.cfg"
    fi
    echo
    echo "Cluster (GET /cluster):"
    print_cluster
    local out
    if [[ $proxy == router ]]; then
        echo
        echo "pgvigil router (http://127.0.0.1:$STATS_PORT/, JSON /stats.json):"
        if out=$(curl -fsS --max-time 2 "http://127.0.0.1:$STATS_PORT/stats.json" 2>/dev/null); then
            python3 -c "$PY_ROUTER_SUMMARY" <<<"$out" || printf '%s\n' "$out"
        else
            echo "  (no answer on 127.0.0.1:$STATS_PORT)"
        fi
    elif out=$(curl -fsS --max-time 2 "http://127.0.0.1:$STATS_PORT/;csv" 2>/dev/null); then
        echo
        echo "HAProxy servers (http://127.0.0.1:$STATS_PORT/):"
        awk -F, '($1 == "primary" || $1 == "replicas") && $2 ~ /^node/ { printf "  %-9s %-6s %s\n", $1, $2, $18 }' <<<"$out"
    fi
    return "$down"
}

usage() {
    echo "usage: scripts/demo.sh up [--haproxy] [--tls] | down | status" >&2
    exit 2
}

main() {
    (($# >= 1)) || usage
    case $1 in
        up)
            local flag
            for flag in "${@:2}"; do
                case $flag in
                    --haproxy) PROXY=haproxy ;;
                    --tls) TLS=1 ;;
                    *) usage ;;
                esac
            done
            ;;
        down | status) (($# == 1)) || usage ;;
        *) usage ;;
    esac
    if [[ $1 != status && $(id -u) -ne 0 ]]; then
        if command -v sudo >/dev/null 2>&1; then
            say "not root: re-running with sudo"
            exec sudo --preserve-env=CARGO_TARGET_DIR,PGVIGIL_DEMO_TIMEOUT -- "$0" "$@"
        fi
        die "run this as root (it installs packages and starts processes as the postgres user)"
    fi
    "cmd_$1"
}

main "$@"
