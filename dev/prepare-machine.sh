#!/bin/sh
# Installs and starts what the demo, the tests and the benchmarks need, on a fresh
# Debian machine: a Docker engine, static busybox (the tests' helper image), age and gpg, xfsprogs, the
# root filesystems of the tests' images (dev/build-rootfs.sh) and pytest for every
# interpreter in $PYTHONS. Does nothing that is already done.
set -eu

missing=""
command -v dockerd >/dev/null 2>&1 || missing="$missing docker.io"
dpkg -s busybox-static >/dev/null 2>&1 || missing="$missing busybox-static"
# age and gpg: encrypted off-host copies (tests, demo)
command -v age >/dev/null 2>&1 || missing="$missing age"
command -v gpg >/dev/null 2>&1 || missing="$missing gnupg"
# mkfs.xfs: the tests' and the bench's XFS folder, where copied archive members share blocks
command -v mkfs.xfs >/dev/null 2>&1 || missing="$missing xfsprogs"
# `prepare-machine.sh bench`: the peers make bench compares with (bench only; never the scripts)
if [ "${1:-}" = bench ]; then
    command -v restic >/dev/null 2>&1 || missing="$missing restic"
    command -v borg >/dev/null 2>&1 || missing="$missing borgbackup"
    # mkfs.ext4: the bench's own engine keeps its volumes on an ext4 with a journal
    command -v mkfs.ext4 >/dev/null 2>&1 || missing="$missing e2fsprogs"
fi
if [ -n "$missing" ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "prepare-machine: installing$missing needs root" >&2
        exit 1
    fi
    echo "prepare-machine: installing$missing" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

if ! docker info >/dev/null 2>&1; then
    if [ "$(id -u)" != 0 ]; then
        echo "prepare-machine: no Docker engine answers, and starting one needs root" >&2
        exit 1
    fi
    echo "prepare-machine: starting dockerd" >&2
    # No bridge or iptables: helper containers run with --network none anyway.
    nohup dockerd --iptables=false --bridge=none >/var/log/ai-stack-backup-dockerd.log 2>&1 &
    tries=0
    until docker info >/dev/null 2>&1; do
        tries=$((tries + 1))
        if [ "$tries" -gt 60 ]; then
            echo "prepare-machine: dockerd did not come up; see /var/log/ai-stack-backup-dockerd.log" >&2
            exit 1
        fi
        sleep 1
    done
fi

# The tests' app image (python3 with sqlite3) and systemd host image come from cached
# debootstrap root filesystems.
if [ "$(id -u)" = 0 ]; then
    sh "$(dirname "$0")/build-rootfs.sh" app python3 >/dev/null
    sh "$(dirname "$0")/build-rootfs.sh" systemd systemd,systemd-sysv,dbus,python3 >/dev/null
fi

for python in ${PYTHONS:-python3}; do
    if ! "$python" -c "import pytest" >/dev/null 2>&1; then
        # pytest 8.4 dropped Python 3.8.
        spec=$("$python" -c 'import sys; print("pytest<8.4" if sys.version_info < (3, 9) else "pytest")')
        echo "prepare-machine: installing $spec for $python" >&2
        "$python" -m pip install -q --disable-pip-version-check "$spec" >/dev/null
    fi
done
