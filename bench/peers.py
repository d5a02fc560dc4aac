#!/usr/bin/env python3
"""`make bench`, part two: the nightly cost of ours against Debian's restic and borg, in one run.

The AI-stack-like volume of bench.py (389 MB) is backed up by each tool
(restic and borg read the volume's folder as root, ours goes through
docker), then changed a little (1 MiB of the database rewritten, 20 new
small files) and backed up again; each restores the second night into an
empty target (three rounds, the tools taking turns to go first; medians
shown). Then fourteen such nights in a row, on the machine's own
filesystem and on a loop-mounted XFS (where our copied members share
blocks); two nights of a volume of 200,000 small files (the second after
one new file); and one day of 24 hourly runs of each tool, against its own
full backup. Prints seconds, disk and ratios; nothing here asserts a time.
restic and borg are bench-only needs.
"""

import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench  # noqa: E402
import engine  # noqa: E402
import testkit  # noqa: E402  (bench put dev/ on the path)

MiB = bench.MiB
NIGHTS = int(os.environ.get("BENCH_NIGHTS", "14"))
HOURS = int(os.environ.get("BENCH_HOURS", "24"))
# One run of each swings by a third between runs minutes apart on this kind of disk.
PEER_ROUNDS = int(os.environ.get("BENCH_PEER_ROUNDS", "3"))
TOOLS = ("ours", "restic", "borg")  # in the columns' order
PEER_ENV = {"RESTIC_PASSWORD": "bench", "BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK": "yes",
            "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}


def quiet(command, env=None):
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   env=dict(os.environ, **PEER_ENV, **(env or {})))


def timed(command, env=None):
    """Seconds (and our peak RSS in MiB, or None) of one run, after writing dirty pages out."""
    return bench.run(command, env=dict(PEER_ENV, **(env or {})))


def small_change(root, night, generator):
    """What a day does to the stack: 1 MiB of the database rewritten, 20 new small files."""
    database = os.path.join(root, "app", "backend", "data", "webui.db")
    with open(database, "r+b") as file:
        file.seek((night * 7 % 190) * MiB)
        file.write(bench.semi_compressible(generator, MiB))
    folder = os.path.join(root, "app", "backend", "data", "cache", "new-%03d" % night)
    os.makedirs(folder)
    for index in range(20):
        with open(os.path.join(folder, "chunk-%02d.json" % index), "wb") as file:
            file.write(bench.semi_compressible(generator, 20 * 1024, random_share=16))
    testkit.next_second()  # our listing trusts no ctime from the second it starts in


class Tool:
    """One tool's backup and restore commands around a repository or folder ``store``."""

    def __init__(self, name, store, volume):
        self.name, self.store, self.volume = name, store, volume
        self.data = testkit.mountpoint(volume)
        self.night = 0

    def init(self):
        os.makedirs(self.store, exist_ok=True)
        if self.name == "restic":
            quiet(["restic", "-q", "-r", self.store, "init"])
        elif self.name == "borg":
            os.rmdir(self.store)
            quiet(["borg", "init", "--encryption=none", self.store])

    def backup(self, env=None):
        self.night += 1
        if self.name == "ours":
            return timed(bench.script("backup_docker_volume.py", self.volume, self.store),
                         env)
        if self.name == "restic":
            return timed(["restic", "-q", "-r", self.store, "backup", "--host", "bench",
                          self.data])
        return timed(["borg", "create", "--compression", "lz4", "%s::night-%03d"
                      % (self.store, self.night), self.data])

    def restore(self, work):
        """Restore the newest backup into an empty target; give seconds."""
        if self.name == "ours":
            target = "aisb-bench-peer-restore-%d" % os.getpid()
            bench.volume_remove(target)
            seconds, _ = timed(bench.script("restore_docker_volume.py", target,
                                            testkit.archives_in(self.store)[-1], "--force"))
            bench.volume_remove(target)
            return seconds
        target = tempfile.mkdtemp(prefix="restore-", dir=work)
        if self.name == "restic":
            seconds, _ = timed(["restic", "-q", "-r", self.store, "restore", "latest",
                                "--target", target])
        else:
            seconds = _in_folder(target, ["borg", "extract", "%s::night-%03d"
                                          % (self.store, self.night)])
        shutil.rmtree(target)
        return seconds


def _in_folder(folder, command):
    """Time ``command`` run with ``folder`` as its working directory (borg extracts there)."""
    here = os.getcwd()
    os.chdir(folder)
    try:
        seconds, _ = timed(command)
    finally:
        os.chdir(here)
    return seconds


def disk_of(path):
    """Bytes under ``path`` on disk, each inode once (no filesystem sharing counted)."""
    seen, total = set(), 0
    for root, _, names in os.walk(path):
        for name in names:
            status = os.lstat(os.path.join(root, name))
            if status.st_ino not in seen:
                seen.add(status.st_ino)
                total += status.st_blocks * 512
    return total


class Xfs:
    """A fresh loop-mounted XFS filesystem; ``used()`` is what the filesystem says it uses."""

    def __init__(self, work, name, size_mb=12000):
        self.image = os.path.join(work, name + ".img")
        self.path = os.path.join(work, name)
        with open(self.image, "wb") as file:
            file.truncate(size_mb * MiB)
        subprocess.run(["mkfs.xfs", "-q", self.image], check=True)
        os.mkdir(self.path)
        subprocess.run(["mount", "-o", "loop", self.image, self.path], check=True)
        self.empty = self.used()

    def used(self):
        os.sync()
        return shutil.disk_usage(self.path).used

    def close(self):
        subprocess.run(["umount", self.path], check=True)
        os.unlink(self.image)


def fresh_volume(source, name):
    bench.volume_remove(name)
    testkit.docker("volume", "create", name)
    testkit.fill_volume(name, source)
    testkit.next_second()
    return name


def two_nights(work, source, volume_name, rows):
    """Night 1, night 2 after a small change, disk after both, restore: each tool, in
    PEER_ROUNDS rounds that take the tools in turn (each goes first once); the medians."""
    taken = {name: [] for name in TOOLS}
    for round_number in range(PEER_ROUNDS):
        for name in TOOLS[round_number % 3:] + TOOLS[:round_number % 3]:
            volume = fresh_volume(source, volume_name)
            tool = Tool(name, os.path.join(work, "two-" + name), volume)
            tool.init()
            first, rss1 = tool.backup()
            small_change(tool.data, 1, random.Random(7))
            second, rss2 = tool.backup()
            disk = disk_of(tool.store)
            restore = tool.restore(work)
            peak = max([rss for rss in (rss1, rss2) if rss] or [0])
            taken[name].append((first, second, disk, restore, peak))
            print("  round %d, %s: night 1 %.2f s, night 2 %.2f s, %.0f MiB on disk, restore "
                  "%.2f s" % (round_number + 1, name, first, second, disk / MiB, restore),
                  flush=True)
            shutil.rmtree(tool.store)
    results = {name: tuple(statistics.median(run[field] for run in taken[name])
                           for field in range(4)) + (max(run[4] for run in taken[name]),)
               for name in TOOLS}
    ours, restic, borg = results["ours"], results["restic"], results["borg"]
    rows.append(("night 1, full backup (s)", ours[0], restic[0], borg[0]))
    rows.append(("night 2, after a small change (s)", ours[1], restic[1], borg[1]))
    rows.append(("disk after the two nights (MiB)", ours[2] / MiB, restic[2] / MiB,
                 borg[2] / MiB))
    rows.append(("restore into an empty target (s)", ours[3], restic[3], borg[3]))
    print("  ours: night 2 / night 1 = %.2f; peak RSS %.1f MiB" % (ours[1] / ours[0], ours[4]))
    return results


def many_nights(work, source, volume_name, rows):
    """NIGHTS small-change nights, retention off: disk at the end, ext4 (here) and XFS."""
    disks = {}
    for place in ("here", "xfs"):
        for name in TOOLS:
            xfs = Xfs(work, "xfs-%s" % name) if place == "xfs" else None
            store = os.path.join(xfs.path if xfs else work, "nights-" + name)
            try:
                volume = fresh_volume(source, volume_name)
                tool = Tool(name, store, volume)
                tool.init()
                generator = random.Random(99)
                for night in range(NIGHTS):
                    if night:
                        small_change(tool.data, night, generator)
                    tool.backup()
                disks[place, name] = xfs.used() - xfs.empty if xfs else disk_of(store)
                print("  %s on %s: %d nights, %.0f MiB" % (
                    name, "XFS" if xfs else "this filesystem", NIGHTS,
                    disks[place, name] / MiB), flush=True)
            finally:
                shutil.rmtree(store, ignore_errors=True)
                if xfs:
                    xfs.close()
    for place, label in (("here", "this filesystem"), ("xfs", "XFS")):
        rows.append(("disk after %d nights, %s (MiB)" % (NIGHTS, label),
                     disks[place, "ours"] / MiB, disks[place, "restic"] / MiB,
                     disks[place, "borg"] / MiB))
    return disks


def many_files(work, volume_name, rows):
    """A volume of bench.MANY_FILES small files: night 1, then night 2 after one new file,
    each tool once (a first backup of many files moves less between runs than the stack's)."""
    source = os.path.join(work, "many")
    bench.make_many_files(source, bench.MANY_FILES)
    taken = {}
    try:
        for name in TOOLS:
            volume = fresh_volume(source, volume_name)
            tool = Tool(name, os.path.join(work, "many-" + name), volume)
            tool.init()
            first, _ = tool.backup()
            with open(os.path.join(tool.data, "d000", "new.txt"), "w") as file:
                file.write("one new file\n")
            testkit.next_second()
            second, _ = tool.backup()
            taken[name] = first, second
            print("  %d files, %s: night 1 %.2f s, night 2 %.2f s" % (
                bench.MANY_FILES, name, first, second), flush=True)
            shutil.rmtree(tool.store)
    finally:
        shutil.rmtree(source)
    label = "%dk small files" % (bench.MANY_FILES // 1000)
    rows.append((label + ": night 1 (s)",) + tuple(taken[name][0] for name in TOOLS))
    rows.append((label + ": night 2, one new file (s)",) + tuple(taken[name][1] for name in TOOLS))


def hourly_day(work, source, volume_name, name):
    """HOURS runs of tool ``name`` with a small change before each, on XFS, against its own
    first (full) backup; give the ratios of time and disk."""
    xfs = Xfs(work, "xfs-hourly-" + name)
    try:
        volume = fresh_volume(source, volume_name)
        tool = Tool(name, os.path.join(xfs.path, "hourly"), volume)
        tool.init()
        full, _ = tool.backup()
        full_disk = xfs.used() - xfs.empty
        generator = random.Random(5)
        seconds = 0.0
        for hour in range(HOURS):
            small_change(tool.data, hour + 1, generator)
            taken, _ = tool.backup()
            seconds += taken
        disk = xfs.used() - xfs.empty - full_disk
        print("  %s, %d hourly runs after a full one on XFS: %.2f s and %.0f MiB; the full "
              "one %.2f s and %.0f MiB: time %.2fx, disk %.2fx of one full backup"
              % (name, HOURS, seconds, disk / MiB, full, full_disk / MiB, seconds / full,
                 disk / full_disk), flush=True)
        return seconds / full, disk / full_disk
    finally:
        xfs.close()


def main():
    for program in ("restic", "borg", "mkfs.xfs", "mkfs.ext4"):
        if shutil.which(program) is None:
            raise SystemExit("bench: %s is missing (make prepare installs it)" % program)
    engine.run_in_own_engine("aisb-peers-", bench_peers)


def bench_peers(work, where):
    testkit.build_helper_image()
    os.environ["BACKUP_HELPER_IMAGE"] = bench.IMAGE
    os.environ["BACKUP_DIR"] = os.path.join(work, "backup-dir")
    # restic's cache and borg's cache, config and keys go with the work folder, not into
    # the HOME of whoever runs the bench.
    os.environ["RESTIC_CACHE_DIR"] = os.path.join(work, "restic-cache")
    os.environ["BORG_BASE_DIR"] = os.path.join(work, "borg-base")
    bench.compiled_as_on_a_host(work)
    volume_name = "aisb-bench-peers-%d" % os.getpid()
    versions = [subprocess.run(command, capture_output=True, text=True).stdout.split("\n")[0]
                for command in (["restic", "version"], ["borg", "--version"])]
    rows = []
    try:
        source = os.path.join(work, "stack")
        size = bench.make_stack_data(source)
        print("peers: %d CPUs, stack data %.0f MB, %s, %s; %s" % (
            len(os.sched_getaffinity(0)), size / 1e6, *versions, where), flush=True)
        results = two_nights(work, source, volume_name, rows)
        disks = many_nights(work, source, volume_name, rows)
        many_files(work, volume_name, rows)
        hourly = {name: hourly_day(work, source, volume_name, name)
                  for name in TOOLS}
        print("\n%-40s %10s %10s %10s %8s %8s" % (
            "peers (one run; two nights: medians)", "ours", "restic", "borg", "ours/restic",
            "ours/borg"))
        for label, ours, restic, borg in rows:
            print("%-40s %10.2f %10.2f %10.2f %7.2fx %7.2fx" % (
                label, ours, restic, borg, ours / restic, ours / borg))
        for name in TOOLS:
            print("%-40s %10.2fx (time)  %.2fx (disk, XFS)" % (
                "%s: %d hourly runs / one full backup" % (name, HOURS), *hourly[name]))
        print("night 2 / night 1: ours %.2fx, restic %.2fx, borg %.2fx; ours on XFS / restic, "
              "%d nights: %.2fx" % (*(results[name][1] / results[name][0]
                                      for name in TOOLS), NIGHTS,
                                    disks["xfs", "ours"] / disks["xfs", "restic"]))
    finally:
        bench.volume_remove(volume_name)


if __name__ == "__main__":
    main()
