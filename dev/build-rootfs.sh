#!/bin/sh
# Builds, once, a root filesystem for the tests' images: a minimal Debian with the
# packages given, e.g. `app python3` (an app container that writes SQLite) or
# `systemd systemd,systemd-sysv,dbus,python3` (a host booted with systemd as PID 1).
# There is no registry here, so it comes from debootstrap with the suite and mirror
# this machine's apt already uses, and is cached as a tarball the tests `docker import`.
# Usage: build-rootfs.sh NAME PACKAGES [TARBALL]; prints the tarball's path.
set -eu

name=$1
packages=$2
# Not ~/.cache/ai-stack-backup: that is the tool's own work folder on an operator's host.
tarball=${3:-${XDG_CACHE_HOME:-$HOME/.cache}/ai-stack-backup-test/$name-rootfs.tar}
if [ -s "$tarball" ]; then
    echo "$tarball"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "build-rootfs: debootstrap needs root" >&2
    exit 1
fi

suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
# The first mirror apt uses for that suite: deb822 .sources files, then sources.list.
mirror=$(cat /etc/apt/sources.list.d/*.sources 2>/dev/null | awk -v suite="$suite" '
    /^URIs:/ { uri = $2 }
    /^Suites:/ { for (i = 2; i <= NF; i++) if ($i == suite && uri != "") { print uri; exit } }')
if [ -z "$mirror" ]; then
    mirror=$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null | awk -v suite="$suite" '
        $1 == "deb" && $3 == suite { print $2; exit }')
fi
if [ -z "$suite" ] || [ -z "$mirror" ]; then
    echo "build-rootfs: cannot tell the Debian suite and mirror from /etc/os-release and apt's sources" >&2
    exit 1
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    echo "build-rootfs: installing debootstrap" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "build-rootfs: debootstrap $suite ($packages) from $mirror (about a minute)" >&2
debootstrap --variant=minbase --include="$packages" "$suite" "$work/root" "$mirror" >"$work/log" 2>&1 || {
    tail -20 "$work/log" >&2
    exit 1
}
# What an app image does not need: documentation, translations, package lists.
rm -rf "$work/root/usr/share/doc" "$work/root/usr/share/man" "$work/root/usr/share/locale" \
    "$work/root/var/cache/apt" "$work/root/var/lib/apt/lists"
mkdir -p "$(dirname "$tarball")"
tar -C "$work/root" --numeric-owner -cf "$tarball.part" .
mv "$tarball.part" "$tarball"
echo "$tarball"
