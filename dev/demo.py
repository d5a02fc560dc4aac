#!/usr/bin/env python3
"""`make demo`: the main job on throwaway volumes, as an operator would run it.

Creates a volume with sample data, backs it up with backup_docker_volume.sh,
verifies and lists the archive, runs backup_all (with an age-encrypted
off-host copy to a folder standing in for the remote) and a restore drill
(drill_restore.py) on it, shows restore_all's plan for it (--dry-run) and their
metrics file, restores the first
archive into a second volume with restore_docker_volume.sh and the off-host
copy into a third, compares them with the original inside a helper
container, and cleans everything up. Each step shows
its seconds. Uses BACKUP_HELPER_IMAGE, else alpine:3.20 if present, else
builds the tests' busybox helper image (no registry needed).
"""

import os
import secrets
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPOSITORY, "scripts")
sys.path.insert(0, os.path.join(REPOSITORY, "dev"))

import testkit  # noqa: E402

COMPARE = ("cd /volume && ls -lnAR --full-time . > /tmp/a && cd /copy && "
           "ls -lnAR --full-time . > /tmp/b && diff /tmp/a /tmp/b && diff -r /volume /copy")


def step(title, command, **environment):
    shown = " ".join("%s=%s" % item for item in sorted(environment.items()))
    print("\n$ " + (shown + " " if shown else "") + " ".join(command), flush=True)
    started = time.monotonic()
    subprocess.run(command, check=True, env=dict(os.environ, **environment))
    print("(%s: %.1f s)" % (title, time.monotonic() - started), flush=True)


def helper_image():
    image = os.environ.get("BACKUP_HELPER_IMAGE")
    if image:
        return image
    if subprocess.run(["docker", "image", "inspect", "alpine:3.20"],
                      capture_output=True).returncode == 0:
        return "alpine:3.20"
    with tempfile.TemporaryDirectory() as workdir:
        testkit.build_helper_image(workdir)
    return testkit.HELPER_IMAGE


def main():
    image = helper_image()
    os.environ["BACKUP_HELPER_IMAGE"] = image
    suffix = secrets.token_hex(3)
    source, copy = "aisb-demo-%s" % suffix, "aisb-demo-copy-%s" % suffix
    from_remote = "aisb-demo-remote-%s" % suffix
    workdir = tempfile.mkdtemp(prefix="aisb-demo-", dir="/var/tmp")
    backups = os.path.join(workdir, "backups")
    # Work files and safety copies go to the demo's own folder, not the host's real one.
    os.environ["BACKUP_DIR"] = backups
    metrics_file = os.path.join(workdir, "ai_stack_backup.prom")
    try:
        sample = os.path.join(workdir, "sample")
        os.makedirs(os.path.join(sample, "app", "backend", "data"))
        database = sqlite3.connect(os.path.join(sample, "app", "backend", "data", "webui.db"))
        database.execute("CREATE TABLE chat (id INTEGER PRIMARY KEY, text BLOB)")
        database.executemany("INSERT INTO chat (text) VALUES (randomblob(1000))",
                             [()] * 200)
        database.commit()
        database.close()
        with open(os.path.join(sample, ".env"), "w") as file:
            file.write("TOKEN=demo\n")
        os.chmod(os.path.join(sample, ".env"), 0o600)
        os.symlink("app/backend/data/webui.db", os.path.join(sample, "db-link"))
        testkit.docker("volume", "create", source)
        testkit.fill_volume(source, sample)
        print("helper image: %s; sample volume: %s" % (image, source), flush=True)
        step("back up", [os.path.join(SCRIPTS, "backup_docker_volume.sh"), source, backups])
        archive = testkit.only_archive(backups)
        step("verify", [os.path.join(SCRIPTS, "verify_backup.py"), archive])
        step("list", [os.path.join(SCRIPTS, "list_backups.py"), backups])
        # An off-host copy, encrypted with age, to a folder standing in for the remote.
        key, remote = os.path.join(workdir, "age-key.txt"), os.path.join(workdir, "remote")
        os.mkdir(remote)
        subprocess.run(["age-keygen", "-o", key], check=True, capture_output=True)
        with open(key) as file:
            recipient = [line.split(": ")[1] for line in file.read().splitlines()
                         if line.startswith("# public key: ")][0]
        testkit.next_second()
        step("backup_all", [os.path.join(SCRIPTS, "backup_all.py")], VOLUMES=source,
             OUTPUT_ROOT="", METRICS_FILE=metrics_file, OFFSITE_ENCRYPT="age:" + recipient,
             OFFSITE_COMMAND='cp "$1" %s/' % remote)
        step("the remote", ["ls", "-l", remote])
        step("drill", [os.path.join(SCRIPTS, "drill_restore.py"), source],
             METRICS_FILE=metrics_file)
        step("whole-stack plan", [os.path.join(SCRIPTS, "restore_all.py"), "--dry-run"],
             VOLUMES=source, OUTPUT_ROOT="")
        print("\n$ cat " + metrics_file, flush=True)
        with open(metrics_file) as file:
            print(file.read(), end="", flush=True)
        step("restore", [os.path.join(SCRIPTS, "restore_docker_volume.sh"), copy, archive,
                         "--force"])
        step("compare", ["docker", "run", "--rm", "--network", "none",
                         "-v", source + ":/volume:ro", "-v", copy + ":/copy:ro",
                         image, "sh", "-euc", COMPARE])
        encrypted = [os.path.join(remote, name) for name in sorted(os.listdir(remote))
                     if name.endswith(".age")][0]
        step("restore from the remote", ["sh", "-c", "age -d -i %s %s | %s %s - --force" % (
            key, encrypted, os.path.join(SCRIPTS, "restore_docker_volume.py"), from_remote)])
        step("compare", ["docker", "run", "--rm", "--network", "none",
                         "-v", source + ":/volume:ro", "-v", from_remote + ":/copy:ro",
                         image, "sh", "-euc", COMPARE])
        print("\ndemo: the restored volumes %s (from the local archive) and %s (from the "
              "encrypted off-host copy) are identical to %s" % (copy, from_remote, source))
    finally:
        for volume in (source, copy, from_remote):
            subprocess.run(["docker", "volume", "rm", "-f", volume], capture_output=True)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
