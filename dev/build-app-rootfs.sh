#!/bin/sh
# Builds, once, the root filesystem of the tests' app image: a minimal Debian with
# python3 (and its sqlite3 module), as an app container that writes SQLite needs.
# There is no registry here, so it comes from debootstrap with the suite and mirror
# this machine's apt already uses, and is cached as a tarball that the tests
# `docker import`. Usage: build-app-rootfs.sh [TARBALL]; prints the tarball's path.
set -eu

tarball=${1:-${AI_STACK_APP_ROOTFS:-${XDG_CACHE_HOME:-$HOME/.cache}/ai-stack-backup/app-rootfs.tar}}
if [ -s "$tarball" ]; then
    echo "$tarball"
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    echo "build-app-rootfs: debootstrap needs root" >&2
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
    echo "build-app-rootfs: cannot tell the Debian suite and mirror from /etc/os-release and apt's sources" >&2
    exit 1
fi

if ! command -v debootstrap >/dev/null 2>&1; then
    echo "build-app-rootfs: installing debootstrap" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "build-app-rootfs: debootstrap $suite from $mirror (about a minute)" >&2
debootstrap --variant=minbase --include=python3 "$suite" "$work/root" "$mirror" >"$work/log" 2>&1 || {
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
