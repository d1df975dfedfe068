#!/usr/bin/env bash
# Installs what building, testing and demonstrating pgvigil needs, and only what is missing.
#
#   scripts/install-deps.sh
#
# Idempotent: a second run changes nothing and says so. Debian 12 is assumed (apt). Run it as
# root; as another user it uses sudo for the steps that need root.
#
# * Debian packages: etcd 3.4 (server + etcdctl), PostgreSQL 15 (+ contrib), HAProxy, protoc and
#   the well-known .proto files (for etcd-client's build script), and the usual build tools.
#   `apt-get update` runs only when something is missing.
# * Rust: must already be installed (rustup); ~/.cargo/bin is put on PATH if it exists.
# * Python: the real Patroni 4.1.5 (`patronictl`), used by the integration tests to check
#   compatibility, and a copy the postgres user can run as an agent in a mixed cluster
#   (/opt/pgvigil/patroni-agent).
# * /var/run/postgresql owned by postgres (PostgreSQL's default socket and lock directory).
set -euo pipefail

APT_PACKAGES=(
    etcd-server etcd-client
    postgresql-15 postgresql-contrib
    haproxy
    protobuf-compiler libprotobuf-dev
    sudo curl iproute2 ca-certificates build-essential pkg-config
    openssl # the demo's --tls CA, and an encrypted-key test
)
PATRONI_VERSION=4.1.5
PIP_PACKAGES=("patroni[etcd3]==${PATRONI_VERSION}" psycopg2-binary)
# Where Patroni goes when the only Python is Debian's own (PEP 668 forbids pip there).
PATRONI_VENV=/opt/pgvigil/patroni-venv

done_steps=()
log() { printf 'install-deps: %s\n' "$*"; }
did() { done_steps+=("$*"); log "$*"; }
die() { printf 'install-deps: ERROR: %s\n' "$*" >&2; exit 1; }

if [[ $(id -u) -eq 0 ]]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo)
else
    SUDO=(__needs_root__)
fi
as_root() {
    if [[ ${SUDO[0]:-} == __needs_root__ ]]; then
        die "this step needs root and sudo is not installed: run scripts/install-deps.sh as root"
    fi
    "${SUDO[@]}" "$@"
}

prepend_path() { [[ -d $1 && :$PATH: != *:"$1":* ]] && PATH="$1:$PATH"; return 0; }
prepend_path "${CARGO_HOME:-$HOME/.cargo}/bin"
prepend_path "${PYENV_ROOT:-$HOME/.pyenv}/bin"
prepend_path "${PYENV_ROOT:-$HOME/.pyenv}/shims"
export PATH

# --- Debian packages -------------------------------------------------------------------------
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    status=$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null || true)
    if [[ $status != "install ok installed" ]]; then
        missing+=("$pkg")
    fi
done
apt_updated=0
apt_install() {
    export DEBIAN_FRONTEND=noninteractive
    if ((!apt_updated)); then
        as_root apt-get update -q
        apt_updated=1
        did "ran apt-get update"
    fi
    # Recommends stay on: protobuf-compiler/libprotobuf-dev need them for the well-known types.
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@"
    did "installed Debian packages: $*"
}
if ((${#missing[@]})); then
    log "missing Debian packages: ${missing[*]}"
    apt_install "${missing[@]}"
fi
command -v protoc >/dev/null || die "protoc not found after installing protobuf-compiler"
[[ -f /usr/include/google/protobuf/timestamp.proto ]] \
    || die "/usr/include/google/protobuf/timestamp.proto is missing (libprotobuf-dev)"
command -v etcd >/dev/null || die "etcd not found after installing etcd-server"
ls /usr/lib/postgresql/*/bin/pg_ctl >/dev/null 2>&1 || die "no PostgreSQL server binaries under /usr/lib/postgresql"
getent passwd postgres >/dev/null || die "the postgres user does not exist (it comes with postgresql-15)"

# --- /var/run/postgresql ---------------------------------------------------------------------
run_dir=/var/run/postgresql
if [[ ! -d $run_dir ]]; then
    as_root install -d -o postgres -g postgres -m 2775 "$run_dir"
    did "created $run_dir (owner postgres)"
elif [[ $(stat -c %U "$run_dir") != postgres ]]; then
    as_root chown postgres:postgres "$run_dir"
    did "made postgres the owner of $run_dir"
fi

# --- Rust ------------------------------------------------------------------------------------
if ! command -v cargo >/dev/null 2>&1; then
    die "cargo not found (looked on PATH and in ${CARGO_HOME:-$HOME/.cargo}/bin). Install Rust with rustup for this user first."
fi
log "cargo: $(cargo --version)"

# --- Patroni (the real patronictl, for compatibility tests) ----------------------------------
patroni_ok() { [[ $(patronictl version 2>/dev/null || true) == "patronictl version ${PATRONI_VERSION}" ]]; }
if patroni_ok; then
    log "patronictl ${PATRONI_VERSION} already installed ($(command -v patronictl))"
else
    if ! command -v python3 >/dev/null 2>&1; then
        apt_install python3 python3-venv
    fi
    externally_managed=$(python3 -c 'import os, sysconfig; print(int(os.path.exists(os.path.join(sysconfig.get_path("stdlib"), "EXTERNALLY-MANAGED"))))')
    if [[ $externally_managed == 1 ]]; then
        # Debian's own Python (PEP 668): a virtualenv, with patronictl linked into /usr/local/bin.
        if ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
            apt_install python3-venv
        fi
        [[ -x $PATRONI_VENV/bin/pip ]] || as_root python3 -m venv "$PATRONI_VENV"
        as_root "$PATRONI_VENV/bin/pip" install -q "${PIP_PACKAGES[@]}"
        as_root ln -sf "$PATRONI_VENV/bin/patronictl" /usr/local/bin/patronictl
        as_root ln -sf "$PATRONI_VENV/bin/patroni" /usr/local/bin/patroni
        hash -r
        did "installed ${PIP_PACKAGES[*]} into $PATRONI_VENV (patronictl linked into /usr/local/bin)"
    else
        python3 -m pip --version >/dev/null 2>&1 || die "$(command -v python3) has no pip; install pip for it"
        python3 -m pip install -q "${PIP_PACKAGES[@]}"
        if command -v pyenv >/dev/null 2>&1; then pyenv rehash; fi
        hash -r
        did "pip-installed ${PIP_PACKAGES[*]} for $(command -v python3)"
    fi
    patroni_ok || die "patronictl ${PATRONI_VERSION} is still not on PATH after installing it"
fi

# --- Patroni as an agent (the mixed pgvigil/Patroni cluster test) -----------------------------
# The integration tests start a real Patroni agent as the postgres user, who cannot read a
# Python under /root: a virtualenv of Debian's own python3 under /opt, readable by everyone.
AGENT_VENV=/opt/pgvigil/patroni-agent
agent_ok() {
    [[ -x $AGENT_VENV/bin/patroni ]] \
        && [[ $(runuser -u postgres -- "$AGENT_VENV/bin/patroni" --version 2>/dev/null || true) == "patroni ${PATRONI_VERSION}" ]]
}
if agent_ok; then
    log "patroni ${PATRONI_VERSION} agent already in $AGENT_VENV"
else
    [[ -x /usr/bin/python3 ]] || apt_install python3
    /usr/bin/python3 -c 'import ensurepip' >/dev/null 2>&1 || apt_install python3-venv
    [[ -x $AGENT_VENV/bin/pip ]] || as_root /usr/bin/python3 -m venv "$AGENT_VENV"
    as_root "$AGENT_VENV/bin/pip" install -q "${PIP_PACKAGES[@]}"
    as_root chmod -R a+rX "$(dirname "$AGENT_VENV")"
    agent_ok || die "patroni ${PATRONI_VERSION} does not run as postgres from $AGENT_VENV"
    did "installed ${PIP_PACKAGES[*]} into $AGENT_VENV for the postgres user"
fi

if ((${#done_steps[@]})); then
    log "done; changes made:"
    printf '  - %s\n' "${done_steps[@]}"
else
    log "everything was already installed; nothing changed"
fi
