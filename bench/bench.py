#!/usr/bin/env python3
"""`make bench`: the tool against the old shell procedure, on the same data, in one run.

Creates AI-stack-like data (a semi-compressible database, incompressible
uploads, thousands of small text files) in a volume and on the host, and a
volume of 200,000 small files. Runs the old procedure and ours alternately
and prints, per step, the seconds of each (median of BENCH_ROUNDS runs), the
ratio, the archive sizes and the peak RSS of our Python process. Benchmarks
are not tests: nothing here asserts a time. Everything runs against an engine
of the bench's own whose volumes live on an ext4 with a journal (engine.py).
"""

import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = os.path.join(REPOSITORY, "scripts")
sys.path.insert(0, os.path.join(REPOSITORY, "dev"))

import testkit  # noqa: E402

import engine  # noqa: E402

ROUNDS = int(os.environ.get("BENCH_ROUNDS", "3"))
MANY_FILES = int(os.environ.get("BENCH_MANY_FILES", "200000"))
IMAGE = os.environ.get("BACKUP_HELPER_IMAGE") or testkit.HELPER_IMAGE
MiB = 1024 * 1024


# --- data -------------------------------------------------------------------

def semi_compressible(generator, size, random_share=96):
    """Database-like 4 KiB pages: JSON-ish rows, zero padding, a few random bytes (ids, hashes)."""
    letters = b"abcdefghijklmnopqrstuvwxyz"
    words = [bytes(generator.choice(letters) for _ in range(generator.randint(3, 10)))
             for _ in range(4000)]
    out = bytearray()
    while len(out) < size:
        rows = b"".join(b'{"id":%d,"user":"%s","text":"%s","score":%.4f}' % (
            generator.getrandbits(32), generator.choice(words),
            b" ".join(generator.choice(words) for _ in range(generator.randint(5, 30))),
            generator.random()) for _ in range(generator.randint(4, 12)))
        page = rows[:4096 - random_share - 200].ljust(4096 - random_share, b"\0")
        out += page + os.urandom(random_share)
    return bytes(out[:size])


def make_stack_data(folder):
    """About 389 MB shaped like the AI stack's volumes; gives its size in bytes.

    A semi-compressible SQLite-like database, incompressible uploads and
    thousands of small JSON/text files.
    """
    generator = random.Random(42)
    data = os.path.join(folder, "app", "backend", "data")
    os.makedirs(os.path.join(data, "uploads"))
    os.makedirs(os.path.join(data, "cache"))
    with open(os.path.join(data, "webui.db"), "wb") as file:
        for _ in range(20):
            file.write(semi_compressible(generator, 10 * MiB))
    for index in range(12):
        with open(os.path.join(data, "uploads", "upload-%02d.pdf" % index), "wb") as file:
            file.write(os.urandom(5 * MiB))
    for index in range(6000):
        sub = os.path.join(data, "cache", "%02d" % (index % 60))
        os.makedirs(sub, exist_ok=True)
        with open(os.path.join(sub, "chunk-%05d.json" % index), "wb") as file:
            file.write(semi_compressible(generator, 20 * 1024, random_share=16))
    return sum(os.path.getsize(os.path.join(root, name))
               for root, _, names in os.walk(folder) for name in names)


def make_many_files(folder, count):
    for index in range(count):
        sub = os.path.join(folder, "d%03d" % (index // 1000))
        if index % 1000 == 0:
            os.makedirs(sub)
        with open(os.path.join(sub, "f%06d.txt" % index), "w") as file:
            file.write("small file %d\n" % index)


# --- running ----------------------------------------------------------------

PRESSURE = "/proc/pressure/io"
QUIET_LIMIT = 30.0  # seconds to wait at most for the disk to settle


def _io_stalled():
    """Microseconds some task has waited for I/O since boot (PSI), or None without PSI."""
    try:
        with open(PRESSURE) as file:
            return int(file.readline().rsplit("total=", 1)[1])
    except (OSError, IndexError, ValueError):
        return None


def settle():
    """Wait until a whole second passes with (almost) no task waiting for I/O: the deletes
    and discards a previous step left behind (a volume of 200,000 files removed) must not
    be billed to the next run. At most QUIET_LIMIT seconds; gives the seconds waited."""
    started = time.monotonic()
    last = _io_stalled()
    while last is not None and time.monotonic() - started < QUIET_LIMIT:
        time.sleep(1)
        now = _io_stalled()
        if now - last < 10000:  # under 1% of the second
            break
        last = now
    return time.monotonic() - started


def run(command, env=None):
    """Run a command; give (seconds, peak RSS in MiB of our Python process, or None).

    Dirty pages are written out first and the disk is let settle, so that no run pays
    for the previous one's writeback or deletes.
    """
    os.sync()
    settle()
    rss_file = None
    if command[0] == sys.executable:  # one of our scripts: measure that process alone
        rss_file = tempfile.mktemp(prefix="aisb-rss-")
        command = [sys.executable, os.path.join(REPOSITORY, "bench", "peak_rss.py"),
                   rss_file] + command[1:]
    started = time.monotonic()
    result = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            env=dict(os.environ, **(env or {})))
    seconds = time.monotonic() - started
    if result.returncode != 0:
        raise SystemExit("bench: %s failed: %s" % (" ".join(command), result.stderr.decode()))
    rss = None
    if rss_file:
        with open(rss_file) as file:
            rss = int(file.read()) / 1024
        os.unlink(rss_file)
    return seconds, rss


def alternately(round_number, old_command, new_command):
    """Run both commands, the old one first in even rounds: neither always gets a fresh disk.

    Gives ``((seconds, rss), (seconds, rss))`` for old and new.
    """
    if round_number % 2:
        new_result = run(new_command)
        return run(old_command), new_result
    old_result = run(old_command)
    return old_result, run(new_command)


def old_backup(volume, folder, name):
    return ["docker", "run", "--rm", "-v", volume + ":/volume:ro", "-v", folder + ":/backup",
            IMAGE, "sh", "-euc", "cd /volume && tar -czf /backup/%s ." % name]


def old_restore(volume, archive):
    return ["docker", "run", "--rm", "-v", volume + ":/volume",
            "-v", os.path.dirname(archive) + ":/backup:ro", IMAGE, "sh", "-euc",
            "rm -rf /volume/* && tar -xzf /backup/%s -C /volume" % os.path.basename(archive)]


def script(name, *arguments):
    return [sys.executable, os.path.join(SCRIPTS, name)] + list(arguments) + ["--quiet"]


def compiled_as_on_a_host(work):
    """Run our scripts as Python runs them on an operator's host: from their compiled
    bytecode, written once (an environment may turn that off, as this machine's does). The
    bytecode goes to the bench's own folder, not into the repository."""
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(work, "bytecode")
    subprocess.run([sys.executable, "-m", "compileall", "-q", SCRIPTS], check=True)


def volume_remove(*names):
    for name in names:
        subprocess.run(["docker", "volume", "rm", "-f", name], capture_output=True)


class Step:
    def __init__(self, name):
        self.name = name
        self.old, self.new, self.rss = [], [], []
        self.old_size = self.new_size = None

    def add(self, old_seconds, new_seconds, rss):
        """Take one round: the baseline's seconds, ours, and our peak RSS."""
        self.old.append(old_seconds)
        self.new.append(new_seconds)
        self.rss.append(rss)

    def line(self):
        old, new = statistics.median(self.old), statistics.median(self.new)
        sizes = ""
        if self.old_size:
            sizes = "  %7.1f MB  %7.1f MB (%+.2f%%)" % (
                self.old_size / 1e6, self.new_size / 1e6,
                100.0 * (self.new_size - self.old_size) / self.old_size)
        rss = [value for value in self.rss if value is not None]
        return "%-34s %7.2f s %7.2f s  %5.2fx  %s%s" % (
            self.name, old, new, new / old, "%6.1f MiB" % max(rss) if rss else "%10s" % "-",
            sizes)


def bench_volume(step_backup, step_restore, step_full, step_drill, volume, work, label):
    archives = os.path.join(work, "archives-" + label)
    os.mkdir(archives)
    for round_number in range(ROUNDS):
        old_name = "old-%d.tar.gz" % round_number
        new_folder = os.path.join(archives, "new-%d" % round_number)
        (seconds, _), (new_seconds, rss) = alternately(
            round_number, old_backup(volume, archives, old_name),
            script("backup_docker_volume.py", volume, new_folder))
        step_backup.add(seconds, new_seconds, rss)
        new_archive = testkit.only_archive(new_folder)
        step_backup.old_size = os.path.getsize(os.path.join(archives, old_name))
        step_backup.new_size = os.path.getsize(new_archive)
        print("  %s round %d: backup old %.2f s, new %.2f s" % (
            label, round_number + 1, step_backup.old[-1], step_backup.new[-1]), flush=True)
        old_target, new_target = ("aisb-bench-restore-%s-%d" % (kind, os.getpid())
                                  for kind in ("old", "new"))
        for target in (old_target, new_target):  # an empty volume for both
            volume_remove(target)
            testkit.docker("volume", "create", target)
        (seconds, _), (new_seconds, rss) = alternately(
            round_number, old_restore(old_target, os.path.join(archives, old_name)),
            script("restore_docker_volume.py", new_target, new_archive, "--force"))
        step_restore.add(seconds, new_seconds, rss)
        print("  %s round %d: restore old %.2f s, new %.2f s" % (
            label, round_number + 1, seconds, new_seconds), flush=True)
        restore_seconds = new_seconds
        # Again, over the full volumes: ours takes its safety copy (into BACKUP_DIR) first.
        (seconds, _), (new_seconds, rss) = alternately(
            round_number, old_restore(old_target, os.path.join(archives, old_name)),
            script("restore_docker_volume.py", new_target, new_archive, "--force"))
        step_full.add(seconds, new_seconds, rss)
        volume_remove(old_target, new_target)
        for name in os.listdir(os.environ["BACKUP_DIR"]):  # the safety copy
            if name.startswith(new_target):
                os.unlink(os.path.join(os.environ["BACKUP_DIR"], name))
        print("  %s round %d: restore over a full volume old %.2f s, new %.2f s" % (
            label, round_number + 1, seconds, new_seconds), flush=True)
        # The drill finds the newest archive in BACKUP_DIR: here, the one just made. Its
        # baseline is our own restore of that archive.
        drill_seconds, rss = run(script("drill_restore.py", volume),
                                 env={"BACKUP_DIR": new_folder})
        step_drill.add(restore_seconds, drill_seconds, rss)
        print("  %s round %d: drill %.2f s" % (label, round_number + 1, drill_seconds),
              flush=True)
        os.unlink(os.path.join(archives, old_name))
        shutil.rmtree(new_folder)


def bench_auto(step, volume, work, label):
    """``--consistency auto`` against ``live`` on the same volume: what looking costs.

    A container that mounts the volume runs meanwhile, so auto has to look into it.
    """
    app = "aisb-bench-app-%s" % label
    testkit.start_app_container(volume, app)
    try:
        _bench_auto_rounds(step, volume, work, label)
    finally:
        subprocess.run(["docker", "rm", "-f", app], capture_output=True)


def _bench_auto_rounds(step, volume, work, label):
    for round_number in range(ROUNDS):
        folders = [os.path.join(work, "%s-%s-%d" % (label, mode, round_number))
                   for mode in ("live", "auto")]
        (seconds, _), (new_seconds, rss) = alternately(
            round_number,
            script("backup_docker_volume.py", volume, folders[0], "--consistency", "live"),
            script("backup_docker_volume.py", volume, folders[1], "--consistency", "auto"))
        step.add(seconds, new_seconds, rss)
        print("  %s round %d: live %.2f s, auto %.2f s" % (
            label, round_number + 1, seconds, new_seconds), flush=True)
        for folder in folders:
            shutil.rmtree(folder)


def disk_bytes(folder):
    """Bytes the files in ``folder`` take on disk, each inode counted once."""
    seen, total = set(), 0
    for entry in os.scandir(folder):
        status = entry.stat(follow_symlinks=False)
        if status.st_ino not in seen:
            seen.add(status.st_ino)
            total += status.st_blocks * 512
    return total


def bench_unchanged(step, volume, work, label):
    """--skip-unchanged: the second backup of an unchanged volume against the first.

    ``old`` is the first (a full backup that records the listing), ``new`` the second (a
    hard link); the sizes column shows the folder's new bytes on disk of each.
    """
    for round_number in range(ROUNDS):
        folder = os.path.join(work, "%s-%d" % (label, round_number))
        os.mkdir(folder)
        command = script("backup_docker_volume.py", volume, folder, "--skip-unchanged")
        first, _ = run(command)
        first_bytes = disk_bytes(folder)
        testkit.next_second()
        second, rss = run(command)
        second_bytes = disk_bytes(folder) - first_bytes
        assert len(testkit.archives_in(folder)) == 2
        step.add(first, second, rss)
        step.old_size, step.new_size = first_bytes, second_bytes
        print("  %s round %d: first %.2f s (%d bytes), unchanged %.2f s (%d new bytes)"
              % (label, round_number + 1, first, first_bytes, second, second_bytes), flush=True)
        shutil.rmtree(folder)


def bench_offsite(step, volume, work, label):
    """backup_all with an off-host copy to a local folder: age-encrypted against plain."""
    key = os.path.join(work, "age-key.txt")
    subprocess.run(["age-keygen", "-o", key], check=True, capture_output=True)
    with open(key) as file:
        recipient = [line.split(": ")[1] for line in file.read().splitlines()
                     if line.startswith("# public key: ")][0]
    for round_number in range(ROUNDS):
        results = {}
        kinds = ("plain", "age") if round_number % 2 == 0 else ("age", "plain")
        for kind in kinds:
            folder, remote = (os.path.join(work, "%s-%s-%s-%d" % (label, kind, part,
                                                                 round_number))
                              for part in ("backups", "remote"))
            os.mkdir(remote)
            env = {"BACKUP_DIR": folder, "VOLUMES": volume, "OUTPUT_ROOT": "",
                   "BACKUP_SKIP_UNCHANGED": "0", "OFFSITE_COMMAND": 'cp "$1" %s/' % remote}
            if kind == "age":
                env["OFFSITE_ENCRYPT"] = "age:" + recipient
            else:
                env["OFFSITE_ALLOW_PLAINTEXT"] = "1"
            results[kind] = run(script("backup_all.py"), env=env)
            shutil.rmtree(folder)
            shutil.rmtree(remote)
        step.add(results["plain"][0], results["age"][0], results["age"][1])
        print("  %s round %d: plain copy %.2f s, age-encrypted copy %.2f s"
              % (label, round_number + 1, results["plain"][0], results["age"][0]), flush=True)


def bench_second_night(step, volume, work, label):
    """A backup after a small change (one new file) against the first, full one, in the same
    folder: what copying the unchanged members saves. Sizes: each archive's bytes."""
    for round_number in range(ROUNDS):
        folder = os.path.join(work, "%s-%d" % (label, round_number))
        os.mkdir(folder)
        command = script("backup_docker_volume.py", volume, folder)
        first, _ = run(command)
        with open(os.path.join(testkit.mountpoint(volume), "bench-new-%d" % round_number),
                  "w") as file:
            file.write("a small change\n")
        testkit.next_second()
        second, rss = run(command)
        archives = testkit.archives_in(folder)
        step.add(first, second, rss)
        step.old_size, step.new_size = (os.path.getsize(path) for path in archives)
        print("  %s round %d: first %.2f s, after a small change %.2f s"
              % (label, round_number + 1, first, second), flush=True)
        shutil.rmtree(folder)


def make_small_volume_data(folder, seed, size):
    """A small volume's data: one semi-compressible file and a few hundred small ones."""
    generator = random.Random(seed)
    os.makedirs(os.path.join(folder, "data", "small"))
    with open(os.path.join(folder, "data", "store.bin"), "wb") as file:
        file.write(semi_compressible(generator, size))
    for index in range(300):
        with open(os.path.join(folder, "data", "small", "%04d.json" % index), "wb") as file:
            file.write(semi_compressible(generator, 4096, random_share=16))


def bench_stack(step, plan_step, volume, work):
    """restore_all of five volumes and OUTPUT_ROOT against the sum of the six single restores
    of the same archives, both over full targets; and how long choosing a recovery point from
    14 nights of five sources takes (against a budget of one second)."""
    volumes = [volume] + ["aisb-bench-stack%d-%d" % (index, os.getpid()) for index in range(4)]
    output_root = os.path.join(work, "stack-output", "output")
    folder = os.path.join(work, "stack-backups")
    app = "aisb-bench-app-%d" % os.getpid()
    try:
        for index, name in enumerate(volumes[1:]):
            data = os.path.join(work, "small-%d" % index)
            make_small_volume_data(data, index, (index + 1) * 10 * MiB)
            testkit.docker("volume", "create", name)
            testkit.fill_volume(name, data)
            shutil.rmtree(data)
        make_many_files(output_root, 3000)
        testkit.docker("run", "-d", "--init", "--name", app, "--network", "none", "-v",
                       volumes[0] + ":/data", IMAGE, "sleep", "100000")
        env = {"BACKUP_DIR": folder, "VOLUMES": " ".join(volumes), "OUTPUT_ROOT": output_root,
               "BACKUP_CONSISTENCY": "live"}
        run(script("backup_all.py"), env)
        archives = testkit.archives_in(folder)
        at = max(os.path.basename(path).rsplit("__", 1)[1][:16] for path in archives)
        singles = [script("restore_docker_volume.py", name, path, "--force",
                          "--stop-containers")
                   for name in volumes for path in archives
                   if os.path.basename(path).startswith(name + "__")]
        singles += [script("restore_path.py", path, output_root, "--force")
                    for path in archives if "stack-output" in os.path.basename(path)]
        for round_number in range(ROUNDS):
            separate = sum(run(command, env)[0] for command in singles)
            testkit.next_second()
            started = time.monotonic()
            with tempfile.TemporaryFile() as out:
                result = subprocess.run(
                    [sys.executable, os.path.join(REPOSITORY, "bench", "peak_rss.py"),
                     os.path.join(work, "rss")] + script("restore_all.py", "--at", at,
                                                         "--force")[1:],
                    stdout=out, stderr=subprocess.PIPE, env=dict(os.environ, **env))
                together = time.monotonic() - started
                out.seek(0)
                shown = out.read().decode()
            if result.returncode:
                raise SystemExit("bench: restore_all failed: %s" % result.stderr.decode())
            with open(os.path.join(work, "rss")) as file:
                rss = int(file.read()) / 1024
            down = [line for line in shown.splitlines() if line.startswith("Applications")]
            step.add(separate, together, rss)
            print("  stack round %d: six single restores %.2f s, restore_all %.2f s; %s"
                  % (round_number + 1, separate, together, down[0] if down else "no downtime"),
                  flush=True)
            for name in os.listdir(folder):  # the safety copies: only the night's set stays
                path = os.path.join(folder, name)
                if ".tar.gz" in name and path not in archives and \
                        not any(path.startswith(archive) for archive in archives):
                    os.unlink(path)
        plan_step.add(*_plan_scan(work, volumes, output_root, archives), None)
        print("  stack plan: %.3f s to choose from 14 nights of 5 sources" % plan_step.new[-1],
              flush=True)
    finally:
        subprocess.run(["docker", "rm", "-f", app], capture_output=True)
        volume_remove(*volumes[1:])
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(os.path.dirname(output_root), ignore_errors=True)


def _plan_scan(work, volumes, output_root, archives):
    """Give (1.0, seconds) for choosing a recovery point in a folder of 14 nights of five
    sources (each night's archives hard links to the real ones): the budget and the time."""
    sys.path.insert(0, SCRIPTS)
    from ai_stack_backup import names, recovery
    folder = os.path.join(work, "fourteen-nights")
    os.mkdir(folder)
    try:
        sources = volumes[:4] + [names.safe_name(output_root)]
        first = names.parse_timestamp(os.path.basename(archives[0]).rsplit("__", 1)[1][:16])
        for night in range(14):
            for index, source in enumerate(sources):
                os.link(archives[0], os.path.join(folder, names.archive_name(
                    source, names.utc_timestamp(first - night * 86400 + index * 60))))
        started = time.monotonic()
        point, _ = recovery.choose(folder, sources, None, 6 * 3600)
        recovery.plan_lines(point, [_Named(source) for source in sources], time.time())
        return 1.0, time.monotonic() - started
    finally:
        shutil.rmtree(folder)


class _Named:
    kind = "source"

    def __init__(self, name):
        self.name = name


def main():
    engine.run_in_own_engine("aisb-bench-", bench_all)


def bench_all(work, where):
    testkit.build_helper_image()
    os.environ["BACKUP_HELPER_IMAGE"] = IMAGE
    # Work files, locks and safety copies go to the bench's own folder, not the host's.
    os.environ["BACKUP_DIR"] = os.path.join(work, "backup-dir")
    compiled_as_on_a_host(work)
    volume, many = "aisb-bench-stack-%d" % os.getpid(), "aisb-bench-many-%d" % os.getpid()
    steps = []
    try:
        source = os.path.join(work, "stack")
        size = make_stack_data(source)
        testkit.docker("volume", "create", volume)
        testkit.fill_volume(volume, source)
        cores = len(os.sched_getaffinity(0))
        print("bench: %d CPUs, Python %s, helper image %s, %d rounds; stack data %.0f MB; %s"
              % (cores, sys.version.split()[0], IMAGE, ROUNDS, size / 1e6, where), flush=True)

        backup, restore = Step("volume backup (389 MB)"), Step("volume restore, empty volume")
        full = Step("volume restore, full volume")
        drill = Step("drill vs our restore, 389 MB")
        bench_volume(backup, restore, full, drill, volume, work, "stack")
        steps += [backup, restore, full, drill]
        auto = Step("auto vs live, 389 MB")
        bench_auto(auto, volume, work, "stack-auto")
        steps.append(auto)
        unchanged = Step("unchanged 2nd vs 1st, 389 MB")
        bench_unchanged(unchanged, volume, work, "stack-unchanged")
        steps.append(unchanged)
        offsite_step = Step("offsite age vs plain, 389 MB")
        bench_offsite(offsite_step, volume, work, "stack-offsite")
        steps.append(offsite_step)
        stack_step = Step("restore_all vs 6 single restores")
        plan_step = Step("plan from 14 nights vs 1 s budget")
        bench_stack(stack_step, plan_step, volume, work)
        steps += [stack_step, plan_step]

        path_step = Step("path backup (389 MB)")
        for round_number in range(ROUNDS):
            old_archive = os.path.join(work, "path-old.tar.gz")
            new_folder = os.path.join(work, "path-new")
            (seconds, _), (new_seconds, rss) = alternately(
                round_number, ["tar", "-czf", old_archive, "-C", work, "stack"],
                script("backup_path.py", source, new_folder))
            path_step.add(seconds, new_seconds, rss)
            path_step.old_size = os.path.getsize(old_archive)
            path_step.new_size = os.path.getsize(testkit.only_archive(new_folder))
            print("  path round %d: tar -czf %.2f s, backup_path %.2f s" % (
                round_number + 1, path_step.old[-1], path_step.new[-1]), flush=True)
            os.unlink(old_archive)
            shutil.rmtree(new_folder)
        steps.append(path_step)
        shutil.rmtree(source)

        many_source = os.path.join(work, "many")
        make_many_files(many_source, MANY_FILES)
        testkit.docker("volume", "create", many)
        testkit.fill_volume(many, many_source)
        many_backup = Step("volume backup, %dk files" % (MANY_FILES // 1000))
        many_restore = Step("volume restore, %dk files" % (MANY_FILES // 1000))
        many_full = Step("restore over full, %dk files" % (MANY_FILES // 1000))
        many_drill = Step("drill vs our restore, %dk files" % (MANY_FILES // 1000))
        bench_volume(many_backup, many_restore, many_full, many_drill, many, work, "many")
        many_auto = Step("auto vs live, %dk files" % (MANY_FILES // 1000))
        bench_auto(many_auto, many, work, "many-auto")
        many_listing = Step("small change, %dk files" % (MANY_FILES // 1000))
        bench_second_night(many_listing, many, work, "many-second")
        many_path = Step("path backup, %dk files" % (MANY_FILES // 1000))
        for round_number in range(ROUNDS):
            (seconds, _), (new_seconds, rss) = alternately(
                round_number,
                ["tar", "-czf", os.path.join(work, "many.tar.gz"), "-C", work, "many"],
                script("backup_path.py", many_source, os.path.join(work, "mp")))
            many_path.add(seconds, new_seconds, rss)
            os.unlink(os.path.join(work, "many.tar.gz"))
            shutil.rmtree(os.path.join(work, "mp"))
        steps += [many_backup, many_restore, many_full, many_drill, many_auto, many_listing,
                  many_path]

        print("\n%-34s %9s %9s %7s %10s  %s" % ("step (median of %d)" % ROUNDS, "old", "new",
                                                "ratio", "peak RSS", "archive old / new"))
        for step in steps:
            print(step.line())
        print("(%d CPUs; old = the runbook's shell procedure in the helper image, or GNU tar "
              "-czf for paths, or for 'auto vs live' our --consistency live, or for 'drill' "
              "our restore of the same archive, for 'unchanged' the first backup (sizes: new "
              "bytes on disk), for 'small change' the first backup into the folder, for "
              "'offsite' backup_all with an unencrypted copy, for 'restore_all' the sum of "
              "the single restores of the same archives, for 'plan' a budget of one second; "
              "peak RSS = our Python process)"
              % cores)
    finally:
        volume_remove(volume, many)


if __name__ == "__main__":
    main()
