#!/usr/bin/env bash
# Creates the Debian base image that deploy/docker/Dockerfile starts FROM, without a registry:
#
#   deploy/images/debian-base.sh bookworm    # -> debian:bookworm-slim
#   deploy/images/debian-base.sh trixie      # -> debian:trixie-slim
#
# debootstrap (minbase) from Debian's mirror, then `docker import` under the name the official
# image has, so the same FROM lines build here and on a machine that can pull. Does nothing when
# the tag exists already (pass --force to rebuild). Run as root (debootstrap needs it).
#
# The result is not byte-identical to Docker Hub's debian:*-slim (which also trims docs and
# locales), but it is the same distribution release with apt configured for it.
set -euo pipefail

release=${1:?usage: debian-base.sh bookworm|trixie [--force]}
force=${2:-}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
tag="debian:${release}-slim"

case $release in
    bookworm | trixie) ;;
    *) echo "debian-base.sh: unsupported release '$release' (bookworm or trixie)" >&2; exit 2 ;;
esac
if [[ $force != --force ]] && docker image inspect "$tag" >/dev/null 2>&1; then
    echo "debian-base.sh: $tag exists"
    exit 0
fi
if ! command -v debootstrap >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
fi
# debootstrap knows trixie only from its own scripts; older debootstraps lack it, sid's script
# builds it the same way.
script=""
if [[ ! -e /usr/share/debootstrap/scripts/$release ]]; then
    script=/usr/share/debootstrap/scripts/sid
fi

rootfs=$(mktemp -d /tmp/debian-base-XXXXXX)
chmod 0755 "$rootfs" # becomes the image's /: mktemp's 0700 would lock every other user out
trap 'rm -rf "$rootfs"' EXIT
start=$SECONDS
debootstrap --variant=minbase "$release" "$rootfs" "$mirror" $script >"$rootfs.log" 2>&1 || {
    tail -30 "$rootfs.log" >&2
    echo "debian-base.sh: debootstrap $release failed (full log: $rootfs.log)" >&2
    exit 1
}
rm -f "$rootfs.log"
# What the official slim images configure: no recommends, no caches kept, the security suite.
cat >"$rootfs/etc/apt/apt.conf.d/docker-slim" <<'APT'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
APT
# Like the official images: no downloaded packages or binary caches left in a layer.
cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APT'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT
cat >"$rootfs/etc/apt/sources.list" <<SRC
deb $mirror $release main
deb $mirror $release-updates main
deb ${mirror%/debian}/debian-security $release-security main
SRC
rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import \
    --change 'CMD ["/bin/bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$tag" >/dev/null
echo "debian-base.sh: built $tag in $((SECONDS - start)) s"
