#!/usr/bin/env bash
# End-to-end test of the deployment: three container "hosts" on their own Docker network and a
# control container that runs the real `ansible-playbook -i inventory.ini deploy_cluster.yml`
# over SSH, exactly as an operator would; then failover, restarts, a rolling restart under
# load, idempotence and a broken inventory.
#
#   deploy/test/e2e.sh                          # docker runtime, PostgreSQL 15 (bookworm)
#   deploy/test/e2e.sh --runtime systemd        # the .deb and Debian's packages on the hosts
#   deploy/test/e2e.sh --pg 17                  # PostgreSQL 17 (trixie)
#   deploy/test/e2e.sh --keep                   # leave the containers running at the end
#   deploy/test/e2e.sh --debug-binaries         # package the dev-profile binaries (CI: no release build)
#
# Run as root on Debian with Docker. It builds what it needs: the release binaries and the
# .deb, the Debian base images (debootstrap + docker import, when missing), the pgvigil image,
# the host and control images. Every container and network it creates is removed at the end,
# also on failure; images are kept (a second run is faster). See docs/deployment.md.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
runtime=docker
pg=15
keep=0
deb_args=()
while (($#)); do
    case $1 in
        --runtime) runtime=${2:?--runtime needs docker or systemd}; shift 2 ;;
        --pg) pg=${2:?--pg needs 15 or 17}; shift 2 ;;
        --keep) keep=1; shift ;;
        --debug-binaries) deb_args=(--debug); shift ;;
        -h | --help) sed -n '2,17p' "$0"; exit 0 ;;
        *) echo "e2e.sh: unknown argument '$1'" >&2; exit 2 ;;
    esac
done
case $runtime in docker | systemd) ;; *) echo "e2e.sh: --runtime must be docker or systemd, not '$runtime'" >&2; exit 2 ;; esac
case $pg in
    15) release=bookworm ;;
    17) release=trixie ;;
    *) echo "e2e.sh: --pg must be 15 (bookworm) or 17 (trixie), not '$pg'" >&2; exit 2 ;;
esac
[[ $(id -u) == 0 ]] || { echo "e2e.sh: run as root (debootstrap, Docker)" >&2; exit 2; }
command -v docker >/dev/null || { echo "e2e.sh: docker is not installed" >&2; exit 2; }
docker info >/dev/null 2>&1 || { echo "e2e.sh: the Docker daemon does not answer" >&2; exit 2; }
# The hosts' own Docker engines use the vfs driver (a full copy of every layer per container):
# a run needs about 15 GB under Docker's root. Say so up front instead of failing half-way with
# "no space left on device" from inside a host.
docker_root=$(docker info -f '{{.DockerRootDir}}' 2>/dev/null || echo /var/lib/docker)
free_gb=$(df --output=avail -B1G "$docker_root" 2>/dev/null | tail -1 | tr -d ' ')
need_gb=${E2E_MIN_FREE_GB:-15}
if [[ $free_gb =~ ^[0-9]+$ ]] && ((free_gb < need_gb)); then
    echo "e2e.sh: only ${free_gb} GB free under $docker_root; the run needs ${need_gb} GB (E2E_MIN_FREE_GB)" >&2
    exit 2
fi

T0=$SECONDS
tag=e2e-$$
WORK=${E2E_WORK:-/tmp/pgvigil-$tag}
mkdir -p "$WORK"
log() { printf '\n[e2e %4d s] %s\n' "$((SECONDS - T0))" "$*"; }
die() { printf '\n[e2e %4d s] FAILED: %s\n' "$((SECONDS - T0))" "$*" >&2; exit 1; }
timings=()
timed() { # timed NAME COMMAND...: runs it and records how long it took
    local name=$1 start=$SECONDS
    shift
    "$@"
    timings+=("$(printf '%-44s %5d s' "$name" "$((SECONDS - start))")")
}

# --- cleanup: only what this run created, by id --------------------------------------------
containers=()
network=""
cleanup() {
    local rc=$?
    if ((keep)); then
        log "--keep: containers ${containers[*]:-none} and network ${network:-none} stay (remove them with docker rm -fv / docker network rm)"
        return
    fi
    if ((${#containers[@]})); then
        docker rm -f -v "${containers[@]}" >/dev/null 2>&1 || true
    fi
    if [[ -n $network ]]; then
        docker network rm "$network" >/dev/null 2>&1 || true
    fi
    [[ -z ${E2E_WORK:-} ]] && rm -rf "$WORK"
    ((rc == 0)) || printf 'e2e.sh: failed after %d s (runtime %s, PostgreSQL %s)\n' "$((SECONDS - T0))" "$runtime" "$pg" >&2
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 1. build ---------------------------------------------------------------------------------
build_packages() {
    log "building the ${deb_args[*]:+dev-profile }binaries and the .deb"
    (cd "$ROOT" && deploy/package/build-deb.sh "${deb_args[@]}") >"$WORK/build-deb.log" 2>&1 \
        || { tail -30 "$WORK/build-deb.log"; die "deploy/package/build-deb.sh failed (log above)"; }
    deb=$(tail -1 "$WORK/build-deb.log")
    [[ -f $deb ]] || die "build-deb.sh did not print the package path"
    mkdir -p "$WORK/artifacts"
    cp "$deb" "$WORK/artifacts/"
    deb_name=$(basename "$deb")
}
build_images() {
    log "building the images (debian:$release-slim when missing, pgvigil:pg$pg, host, control)"
    "$ROOT/deploy/images/debian-base.sh" bookworm
    [[ $release == bookworm ]] || "$ROOT/deploy/images/debian-base.sh" "$release"
    local ctx=$WORK/context
    mkdir -p "$ctx/extra-ca"
    cp "$ROOT"/deploy/test/*.Dockerfile "$ctx/"
    # Certificate authorities this machine trusts beyond Debian's (PyPI behind a TLS proxy).
    cp /usr/local/share/ca-certificates/*.crt "$ctx/extra-ca/" 2>/dev/null || true
    local host_docker=0 host_release=$release
    if [[ $runtime == docker ]]; then host_docker=1; host_release=bookworm; fi
    host_image=pgvigil-e2e-host:$host_release-$runtime
    # The three builds mostly wait for Debian's mirror and PyPI: run them side by side.
    local pids=() names=() i
    docker build --network host -f "$ctx/control.Dockerfile" -t pgvigil-e2e-control:bookworm "$ctx" \
        >"$WORK/build-control.log" 2>&1 &
    pids+=($!) names+=(control)
    docker build --network host --build-arg DEBIAN_RELEASE="$host_release" --build-arg HOST_DOCKER=$host_docker \
        -f "$ctx/host.Dockerfile" -t "$host_image" "$ctx" >"$WORK/build-host.log" 2>&1 &
    pids+=($!) names+=(host)
    if [[ $runtime == docker ]]; then
        (cd "$ROOT" && docker build --network host -f deploy/docker/Dockerfile \
            --build-arg DEBIAN_RELEASE="$release" --build-arg PG_MAJOR="$pg" \
            --build-arg PGVIGIL_DEB="target/debian/$deb_name" -t "pgvigil:pg$pg" .) >"$WORK/build-image.log" 2>&1 &
        pids+=($!) names+=(image)
    fi
    for i in "${!pids[@]}"; do
        wait "${pids[i]}" || { tail -30 "$WORK/build-${names[i]}.log"; die "building the ${names[i]} image failed (log above)"; }
    done
    if [[ $runtime == docker ]]; then
        docker save "pgvigil:pg$pg" -o "$WORK/artifacts/pgvigil-pg$pg.tar"
    fi
}
timed "build: binaries and .deb" build_packages
timed "build: images" build_images

# --- hosts and control node -------------------------------------------------------------------
start_hosts() {
    log "starting three hosts and the control node on their own network"
    local i
    for i in $(seq 0 40); do
        subnet_prefix=172.$((28 + i / 8)).$(((i % 8) * 16 + 3))
        if network=$(docker network create --subnet "$subnet_prefix.0/24" --ip-range "$subnet_prefix.0/25" \
            --label pgvigil-e2e "pgvigil-$tag" 2>/dev/null); then
            break
        fi
        network=""
    done
    [[ -n $network ]] || die "could not create a Docker network (every tried 172.28-33 subnet overlaps)"
    hosts=("$subnet_prefix.11" "$subnet_prefix.12" "$subnet_prefix.13")
    vip=$subnet_prefix.200 # outside the ip-range Docker assigns from
    control_ip=$subnet_prefix.5
    mkdir -p "$WORK/ssh"
    ssh-keygen -q -t ed25519 -N '' -f "$WORK/ssh/id_ed25519" <<<y >/dev/null 2>&1 || true
    cp "$WORK/ssh/id_ed25519.pub" "$WORK/ssh/authorized_keys"
    chmod 600 "$WORK/ssh/id_ed25519" "$WORK/ssh/authorized_keys"
    host_ids=()
    local n volume=()
    [[ $runtime == docker ]] && volume=(-v /var/lib/docker)
    for n in 1 2 3; do
        id=$(docker run -d --name "pgvigil-$tag-node$n" --hostname "node$n" --label pgvigil-e2e \
            --network "$network" --ip "${hosts[n - 1]}" \
            --cap-add ALL --cap-drop SYS_RESOURCE --security-opt seccomp=unconfined --security-opt apparmor=unconfined \
            --tmpfs /run --tmpfs /run/lock -v /sys/fs/cgroup:/sys/fs/cgroup:rw --cgroupns=host \
            "${volume[@]}" -v "$WORK/ssh/authorized_keys:/root/.ssh/authorized_keys:ro" "$host_image")
        containers+=("$id")
        host_ids+=("$id")
    done
    mkdir -p "$WORK/ansible"
    cp -r "$ROOT/deploy/ansible/." "$WORK/ansible/"
    rm -rf "$WORK/ansible/secrets"
    local artifact="pgvigil_deb=/work/artifacts/$deb_name"
    [[ $runtime == docker ]] && artifact="pgvigil_image_archive=/work/artifacts/pgvigil-pg$pg.tar"
    cat >"$WORK/ansible/inventory.ini" <<INV
[cluster_nodes]
node1 ansible_host=${hosts[0]}
node2 ansible_host=${hosts[1]}
node3 ansible_host=${hosts[2]}

[cluster_nodes:vars]
ansible_user=root
pgvigil_runtime=$runtime
pgvigil_pg_major=$pg
pgvigil_vip=$vip
pgvigil_synchronous_mode=on
$artifact
INV
    control=$(docker run -d --name "pgvigil-$tag-control" --hostname control --label pgvigil-e2e \
        --network "$network" --ip "$control_ip" \
        -v "$WORK/ansible:/work/ansible" -v "$WORK/artifacts:/work/artifacts:ro" -v "$ROOT/deploy/test:/work/test:ro" \
        -v "$WORK/ssh/id_ed25519:/root/.ssh/id_ed25519:ro" -w /work/ansible pgvigil-e2e-control:bookworm)
    containers+=("$control")
    local h ok
    for h in "${hosts[@]}"; do
        ok=0
        for _ in $(seq 1 60); do
            if docker exec "$control" ssh -o BatchMode=yes -o StrictHostKeyChecking=no -o ConnectTimeout=2 "root@$h" \
                'systemctl is-system-running --wait >/dev/null 2>&1; true' >/dev/null 2>&1; then
                ok=1
                break
            fi
            sleep 1
        done
        ((ok)) || die "host $h does not answer over SSH within 60 s"
    done
}
timed "hosts: start, SSH up" start_hosts

ctl() { docker exec "$control" "$@"; }
on_host() { local h=$1; shift; ctl ssh -o BatchMode=yes -o StrictHostKeyChecking=no "root@$h" "$@"; }
check() { ctl python3 /work/test/checks.py "$@"; }

# --- step 1: the operator's command --------------------------------------------------------------
lint() {
    log "ansible-lint --profile production, and the playbooks' syntax"
    ctl ansible-lint --profile production >"$WORK/lint.log" 2>&1 || { tail -40 "$WORK/lint.log"; die "ansible-lint failed"; }
    tail -1 "$WORK/lint.log"
    local p
    for p in deploy_cluster.yml rolling_restart.yml replace_node.yml add_node.yml; do
        ctl ansible-playbook -i inventory.ini --syntax-check -e pgvigil_node=node1 "$p" >>"$WORK/lint.log" 2>&1 \
            || { tail -20 "$WORK/lint.log"; die "ansible-playbook --syntax-check $p failed"; }
    done
}
timed "ansible-lint, syntax" lint

deploy() {
    log "step 1: ansible-playbook -i inventory.ini deploy_cluster.yml (runtime $runtime, PostgreSQL $pg)"
    ctl ansible-playbook -i inventory.ini deploy_cluster.yml >"$WORK/deploy-1.log" 2>&1 \
        || { tail -60 "$WORK/deploy-1.log"; die "deploy_cluster.yml failed (log above)"; }
    grep -A4 'PLAY RECAP' "$WORK/deploy-1.log"
}
timed "step 1: deploy_cluster.yml" deploy

# --- step 2: the cluster ------------------------------------------------------------------------
hosts_csv=$(IFS=,; echo "${hosts[*]}")
timed "step 2: cluster checks" check cluster --hosts "$hosts_csv" --vip "$vip"

# --- step 3: the leader's host dies under writes ------------------------------------------------
leader_host() { # prints the address of the leader's host, asking the given hosts' REST APIs
    local h
    for h in "$@"; do
        if out=$(ctl curl -fsS --max-time 3 "http://$h:8008/cluster" 2>/dev/null); then
            python3 -c 'import json,sys; d=json.load(sys.stdin); print(next(m["host"] for m in d["members"] if m["role"]=="leader" and m["state"]=="running"))' <<<"$out" 2>/dev/null && return 0
        fi
    done
    return 1
}
start_writer() { # start_writer NAME: writes through the floating address until stop_writer NAME
    ctl rm -f "/tmp/$1.stop" "/tmp/$1.json"
    docker exec -d "$control" sh -c "python3 /work/test/checks.py writer --target $vip:5000 --out /tmp/$1.json --stop /tmp/$1.stop >/tmp/$1.log 2>&1"
    # Bounded wait for the first acknowledged write, so the fault hits a running writer.
    for _ in $(seq 1 60); do
        ctl psql -tA "postgresql://postgres:$(ctl sh -c 'cut -d" " -f1 /work/ansible/secrets/pgvigil/superuser')@$vip:5000/postgres?connect_timeout=2" \
            -c 'select count(*) from e2e_writes' >/dev/null 2>&1 && return 0
        sleep 1
    done
    die "the writer made no write through $vip:5000 within 60 s"
}
stop_writer() {
    ctl touch "/tmp/$1.stop"
    for _ in $(seq 1 60); do
        ctl test -f "/tmp/$1.json" && { ctl cat "/tmp/$1.log"; return 0; }
        sleep 1
    done
    ctl cat "/tmp/$1.log" || true
    die "the writer did not stop within 60 s"
}
kill_leader_host() {
    local leader
    leader=$(leader_host "${hosts[@]}") || die "no leader found before the fault"
    local index
    for index in 0 1 2; do [[ ${hosts[index]} == "$leader" ]] && break; done
    dead_index=$index
    log "step 3: killing the leader's host node$((index + 1)) ($leader) while a client writes through $vip:5000"
    start_writer failover
    docker kill "${host_ids[index]}" >/dev/null
    local survivors=() h
    for h in "${hosts[@]}"; do [[ $h == "$leader" ]] || survivors+=("$h"); done
    local new=""
    for _ in $(seq 1 180); do
        new=$(leader_host "${survivors[@]}" || true)
        [[ -n $new && $new != "$leader" ]] && break
        sleep 1
    done
    [[ -n $new && $new != "$leader" ]] || die "no new leader among ${survivors[*]} within 180 s"
    log "new leader: $new; waiting for the writer's writes to resume through $vip:5000"
    local rows_now
    rows_now=$(check state --target "$vip:5000" --timeout 120 | tail -1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["rows"])')
    check state --target "$vip:5000" --timeout 120 --min-rows "$rows_now" >/dev/null
    stop_writer failover
    check verify --target "$vip:5000" --writes /tmp/failover.json | tee "$WORK/failover.txt"
    log "step 3: bringing the dead host back"
    docker start "${host_ids[index]}" >/dev/null
    check cluster --hosts "$hosts_csv" --vip "$vip" >/dev/null || die "the cluster did not heal after node$((index + 1)) came back"
    log "all three members run again"
}
timed "step 3: leader host killed, failover, rejoin" kill_leader_host

# --- step 4: restarts -----------------------------------------------------------------------------
restart_everything() {
    local before after h
    before=$(check state --target "$vip:5000" | tail -1)
    log "step 4: restarting every service container / unit on every host (state before: $before)"
    for h in "${hosts[@]}"; do
        if [[ $runtime == docker ]]; then
            on_host "$h" docker restart -t 120 pgvigil-etcd pgvigil pgvigil-router pgvigil-vip >/dev/null &
        else
            on_host "$h" systemctl restart etcd pgvigil pgvigil-router pgvigil-vip &
        fi
    done
    wait
    check cluster --hosts "$hosts_csv" --vip "$vip" >/dev/null
    after=$(check state --target "$vip:5000" | tail -1)
    log "after the service restarts: $after"
    log "step 4: restarting every host"
    docker restart -t 150 "${host_ids[@]}" >/dev/null
    for h in "${hosts[@]}"; do
        for _ in $(seq 1 90); do
            on_host "$h" true >/dev/null 2>&1 && break
            sleep 1
        done
    done
    check cluster --hosts "$hosts_csv" --vip "$vip" >/dev/null
    after_hosts=$(check state --target "$vip:5000" | tail -1)
    log "after the host restarts: $after_hosts"
    python3 - "$before" "$after" "$after_hosts" <<'PY'
import json, sys
b, a, h = (json.loads(x) for x in sys.argv[1:])
for name, s in (("service restarts", a), ("host restarts", h)):
    if s["sysid"] != b["sysid"]:
        sys.exit(f"FAILED: after the {name} the system identifier is {s['sysid']}, was {b['sysid']}: a new bootstrap")
    if s["rows"] != b["rows"]:
        sys.exit(f"FAILED: after the {name} e2e_writes has {s['rows']} rows, had {b['rows']}")
print(f"ok  same data after both restarts: sysid {b['sysid']}, {b['rows']} rows, timeline {b['timeline']} -> {h['timeline']}")
PY
}
timed "step 4: restart services, then hosts" restart_everything

# --- step 5: rolling restart under load ----------------------------------------------------------
rolling() {
    log "step 5: rolling_restart.yml while a client writes through $vip:5000"
    start_writer rolling
    # Task start times in the log, to line the write pauses up with the playbook's steps.
    if ! docker exec -e ANSIBLE_CALLBACKS_ENABLED=ansible.posix.profile_tasks "$control" \
        ansible-playbook -i inventory.ini rolling_restart.yml >"$WORK/rolling.log" 2>&1; then
        stop_writer rolling || true
        tail -60 "$WORK/rolling.log"
        die "rolling_restart.yml failed (log above)"
    fi
    stop_writer rolling
    check verify --target "$vip:5000" --writes /tmp/rolling.json | tee "$WORK/rolling.txt"
    python3 - "$(tail -1 "$WORK/rolling.txt")" <<'PY'
import json, sys
r = json.loads(sys.argv[1])
# One switchover moment: the connection the router closes, plus the floating address and the old
# leader's router moving on; each can break the one connection the writer has in flight.
if r["pauses_over_3s"] > 1:
    sys.exit(f"FAILED: {r['pauses_over_3s']} write pauses over 3 s; only the switchover's is expected")
if r["failed_transactions"] > 3:
    sys.exit(f"FAILED: {r['failed_transactions']} failed transactions; only those in flight at the switchover are expected")
print(f"ok  rolling restart: write pause {r['max_gap']} s, {r['failed_transactions']} failed transactions (in flight), 0 acknowledged writes lost")
PY
    check cluster --hosts "$hosts_csv" --vip "$vip" >/dev/null
}
timed "step 5: rolling restart under load" rolling

# --- step 6: idempotence and a broken inventory -------------------------------------------------
snapshot() {
    local h
    for h in "${hosts[@]}"; do
        if [[ $runtime == docker ]]; then
            on_host "$h" 'stat -c "%n %Y" /etc/pgvigil/pgvigil.yml; docker ps -a --format "{{.Names}} {{.ID}} {{.Status}}" | sed "s/ Up .*/ up/"; docker inspect -f "{{.Name}} {{.State.StartedAt}}" $(docker ps -aq)'
        else
            on_host "$h" 'stat -c "%n %Y" /etc/pgvigil/pgvigil.yml; systemctl show -p Id -p ActiveEnterTimestamp etcd pgvigil pgvigil-router pgvigil-vip'
        fi
    done
}
idempotence() {
    log "step 6: deploy_cluster.yml again: nothing may change"
    ctl ansible-playbook -i inventory.ini deploy_cluster.yml >"$WORK/deploy-2.log" 2>&1 \
        || { tail -60 "$WORK/deploy-2.log"; die "the second deploy_cluster.yml failed"; }
    grep -A4 'PLAY RECAP' "$WORK/deploy-2.log"
    if grep -E '^node[0-9].*changed=[1-9]' "$WORK/deploy-2.log" >/dev/null; then
        grep -B2 -E '^changed:' "$WORK/deploy-2.log" | head -40
        die "the second run changed something (see above)"
    fi
    echo "ok  second run: changed=0 on every host"
    local before after
    before=$(snapshot)
    log "step 6: broken inventories: a clear error, nothing changed on the hosts"
    ctl sh -c "sed 's/^node3 ansible_host=.*/node3 ansible_host=${hosts[1]}/' inventory.ini > broken-duplicate.ini"
    ctl sh -c "grep -v '^node3 ' inventory.ini > broken-two-nodes.ini"
    local inv out
    for inv in broken-duplicate.ini broken-two-nodes.ini; do
        if out=$(ctl ansible-playbook -i "$inv" deploy_cluster.yml 2>&1); then
            die "deploy_cluster.yml accepted $inv"
        fi
        printf '%s\n' "$out" | grep -E 'inventory: ' | head -2 | sed "s/^/  $inv: /"
        printf '%s\n' "$out" | grep -qE 'have the same address|odd number of etcd members' \
            || { printf '%s\n' "$out" | tail -20; die "$inv: the error does not say what is wrong"; }
    done
    after=$(snapshot)
    [[ $before == "$after" ]] || { diff <(echo "$before") <(echo "$after") || true; die "a broken inventory changed something on the hosts"; }
    echo "ok  broken inventories were refused before any change"
}
timed "step 6: idempotence, broken inventories" idempotence

log "passed: runtime $runtime, PostgreSQL $pg"
printf '%s\n' "${timings[@]}"
printf '%-44s %5d s\n' "total" "$((SECONDS - T0))"
