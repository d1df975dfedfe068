#!/usr/bin/env bash
# Builds target/debian/pgvigil_<version>_<arch>.deb: pgvigil and pgvigilctl, the systemd units
# for the agent, the router and the floating address, and /etc/pgvigil/.
#
#   deploy/package/build-deb.sh             # cargo build --release, then the package
#   deploy/package/build-deb.sh --no-build  # package the release binaries already built
#   deploy/package/build-deb.sh --debug     # the dev-profile binaries (quicker to build; tests only)
#
# dpkg-deb only (no cargo-deb to install): the layout is small and fixed, and this works offline.
# Installing the package starts and enables nothing: the units have ConditionPathExists on
# /etc/pgvigil/pgvigil.yml, and the operator (or deploy/ansible) enables them.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
HERE=$ROOT/deploy/package
cd "$ROOT"

build=1
profile_dir=release
cargo_profile=(--release)
for arg in "$@"; do
    case $arg in
        --no-build) build=0 ;;
        --debug) profile_dir=debug; cargo_profile=() ;;
        *) echo "build-deb.sh: unknown argument '$arg' (known: --no-build, --debug)" >&2; exit 2 ;;
    esac
done
if ((build)); then
    cargo build "${cargo_profile[@]}" --locked -p pgvigil -p pgvigilctl
fi
target_dir=${CARGO_TARGET_DIR:-$ROOT/target}
bin_dir=$target_dir/$profile_dir
for bin in pgvigil pgvigilctl; do
    [[ -x $bin_dir/$bin ]] || { echo "build-deb.sh: $bin_dir/$bin is missing (build it or drop --no-build)" >&2; exit 1; }
done

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version *= *"\(.*\)"/\1/p' Cargo.toml)
[[ -n $version ]] || { echo "build-deb.sh: no version in Cargo.toml [workspace.package]" >&2; exit 1; }
arch=$(dpkg --print-architecture)
out_dir=$target_dir/debian
deb=$out_dir/pgvigil_${version}-1_${arch}.deb

stage=$(mktemp -d)
chmod 0755 "$stage" # the package's ./ entry: the root directory
trap 'rm -rf "$stage"' EXIT
install -d -m 0755 "$stage/DEBIAN" "$stage/usr/bin" "$stage/lib/systemd/system" \
    "$stage/usr/lib/tmpfiles.d" "$stage/usr/share/doc/pgvigil/examples"
install -m 0755 -s "$bin_dir/pgvigil" "$bin_dir/pgvigilctl" "$stage/usr/bin/"
install -m 0644 "$HERE"/systemd/*.service "$stage/lib/systemd/system/"
install -m 0644 "$HERE/tmpfiles.conf" "$stage/usr/lib/tmpfiles.d/pgvigil.conf"
install -m 0644 crates/config/src/sample.yml "$stage/usr/share/doc/pgvigil/examples/pgvigil.yml"
install -m 0644 README.md "$stage/usr/share/doc/pgvigil/README.md"
install -m 0644 crates/router/README.md "$stage/usr/share/doc/pgvigil/README.router.md"
cat >"$stage/usr/share/doc/pgvigil/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: pgvigil

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
COPY

# The highest glibc symbol version the binaries use sets the libc6 dependency.
glibc=$(objdump -T "$stage"/usr/bin/* | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
installed_size=$(du -sk "$stage" | cut -f1)
cat >"$stage/DEBIAN/control" <<CONTROL
Package: pgvigil
Version: ${version}-1
Architecture: ${arch}
Maintainer: pgvigil maintainers <pgvigil@localhost>
Installed-Size: ${installed_size}
Depends: libc6 (>= ${glibc}), libgcc-s1, postgresql-common, iproute2
Recommends: etcd-client
Suggests: etcd-server, haproxy
Section: database
Priority: optional
Homepage: https://github.com/pgvigil/pgvigil
Description: Patroni-compatible PostgreSQL high-availability agent
 pgvigil keeps a PostgreSQL cluster available: it elects a leader through etcd v3, promotes a
 replica when the primary fails, and serves Patroni's REST API. It reads Patroni's YAML
 configuration and stores Patroni's keys, so patronictl and HAProxy checks work unchanged.
 .
 This package holds pgvigil (the agent, the router with "pgvigil router" and the floating
 address with "pgvigil vip"), pgvigilctl (the operator's CLI) and their systemd units. Put the
 configuration in /etc/pgvigil/pgvigil.yml, then enable pgvigil.service.
CONTROL
# postgresql-common creates the postgres user; /etc/pgvigil holds passwords: root and postgres only.
cat >"$stage/DEBIAN/postinst" <<'POSTINST'
#!/bin/sh
set -e
if [ "$1" = configure ]; then
    install -d -m 0750 -o root -g postgres /etc/pgvigil
    if [ -d /run/systemd/system ]; then
        systemd-tmpfiles --create /usr/lib/tmpfiles.d/pgvigil.conf || true
        systemctl daemon-reload || true
    else
        install -d -m 2775 -o postgres -g postgres /run/postgresql
    fi
fi
exit 0
POSTINST
cat >"$stage/DEBIAN/postrm" <<'POSTRM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload || true
fi
if [ "$1" = purge ]; then
    rmdir /etc/pgvigil 2>/dev/null || true
fi
exit 0
POSTRM
cat >"$stage/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
# On removal (not on upgrade) stop what runs: the agent hands its leadership over first.
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop pgvigil-vip.service pgvigil-router.service pgvigil.service || true
fi
exit 0
PRERM
chmod 0755 "$stage/DEBIAN/postinst" "$stage/DEBIAN/postrm" "$stage/DEBIAN/prerm"

mkdir -p "$out_dir"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
