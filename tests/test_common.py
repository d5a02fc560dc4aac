"""Names, timestamps, atomic archives, leftovers of killed runs, retention and the lock."""

import errno
import fcntl
import hashlib
import os
import re
import stat
import subprocess
import sys
import time

import pytest

from ai_stack_backup import config, files
from ai_stack_backup.names import archive_name, parse_archive_name, parse_timestamp, safe_name, \
    utc_timestamp
from ai_stack_backup import retention
from ai_stack_backup.backupall import backup_all_lock
from ai_stack_backup.config import Config
from ai_stack_backup.errors import ArchiveExists, BackupError, ConfigError, Locked
from ai_stack_backup.files import AtomicArchive
from conftest import SCRIPTS


@pytest.mark.parametrize("path, expected", [
    ("/home/wasti/x y", "home_wasti_x_y"),
    ("/home/wasti/ai_stack_data/transcript-miner/output",
     "home_wasti_ai_stack_data_transcript-miner_output"),
    ("relative/dir", "relative_dir"),
    ("//double", "_double"),
    ("/tmp/ä+b.c-d_e", "tmp___b.c-d_e"),
])
def test_safe_name_is_the_old_rule(path, expected):
    assert safe_name(path) == expected


def test_timestamps_and_archive_names():
    assert utc_timestamp(1768737600) == "20260118T120000Z"
    assert re.fullmatch(r"\d{8}T\d{6}Z", utc_timestamp())
    assert parse_timestamp("20260118T120000Z") == 1768737600
    assert archive_name("owui-data", "20260118T120000Z") == \
        "owui-data__20260118T120000Z.tar.gz"
    assert parse_archive_name("my__vol__20260118T120000Z.tar.gz") == \
        ("my__vol", "20260118T120000Z")
    for lookalike in ("owui-data__20261399T999999Z.tar.gz", "owui-data__20260118T120000Z.tar",
                      "owui-data_20260118T120000Z.tar.gz", "__20260118T120000Z.tar.gz",
                      "owui-data__20260118T120000Z.tar.gz.part", "owui-data.tar.gz",
                      "x__20260118T120000.tar.gz"):
        assert parse_archive_name(lookalike) is None, lookalike


def test_atomic_archive_publishes_without_overwriting(tmp_path):
    final = tmp_path / "a__20260118T120000Z.tar.gz"
    with AtomicArchive(str(final)) as archive:
        assert not archive.temp_path.endswith(".tar.gz")
        assert os.path.dirname(archive.temp_path) == str(tmp_path)
        assert stat.S_IMODE(os.stat(archive.temp_path).st_mode) == 0o600
        archive.file.write(b"data")
        archive.publish()
    assert final.read_bytes() == b"data" and os.listdir(str(tmp_path)) == [final.name]
    with pytest.raises(ArchiveExists, match="already exists"):
        AtomicArchive(str(final))
    with AtomicArchive(str(tmp_path / "b.tar.gz")) as archive:
        (tmp_path / "b.tar.gz").write_bytes(b"someone else's")
        archive.file.write(b"mine")
        with pytest.raises(ArchiveExists, match="already exists"):
            archive.publish()
    assert (tmp_path / "b.tar.gz").read_bytes() == b"someone else's"
    assert sorted(os.listdir(str(tmp_path))) == ["a__20260118T120000Z.tar.gz", "b.tar.gz"]


def _written(tmp_path, name, steps, link_identical=True):
    """Publish ``name`` from ``steps`` (("copy", offset, length) of the file ``old``, or
    ("write", bytes)) through an AtomicArchive; give (its path, the archive)."""
    old = tmp_path / "old"
    descriptor = os.open(str(old), os.O_RDONLY)
    try:
        with AtomicArchive(str(tmp_path / name)) as archive:
            for step in steps:
                if step[0] == "copy":
                    archive.output.copy(descriptor, step[1], os.pread(descriptor, step[2],
                                                                       step[1]))
                else:
                    archive.output.write(step[1])
            archive.publish(checksum=True, link_identical=link_identical)
    finally:
        os.close(descriptor)
    return tmp_path / name, archive


def _checksum_is_right(path):
    with open(str(path) + ".sha256") as file:
        digest, name = file.read().split()
    return name == path.name and digest == files.file_sha256(str(path))


def test_an_archive_that_is_the_file_it_was_copied_from_is_a_link_to_it(tmp_path):
    old = tmp_path / "old"
    data = os.urandom(300000)
    old.write_bytes(data)
    # Copied in three members at their own offsets, and one written equal to its bytes.
    path, archive = _written(tmp_path, "same.tar.gz", [
        ("copy", 0, 1000), ("copy", 1000, 200000), ("write", data[201000:250000]),
        ("copy", 250000, 50000)])
    assert os.path.samefile(str(path), str(old)) and archive.linked == str(old)
    assert _checksum_is_right(path)
    assert not [name for name in os.listdir(str(tmp_path)) if name.startswith(".")]
    # Not asked to (the runbook command, BACKUP_SKIP_UNCHANGED=0): a file of its own.
    path, archive = _written(tmp_path, "own.tar.gz", [("copy", 0, 300000)],
                             link_identical=False)
    assert not os.path.samefile(str(path), str(old)) and archive.linked is None
    assert path.read_bytes() == data and _checksum_is_right(path)


def test_a_link_to_another_file_that_took_the_path_is_removed_and_the_archive_written(
        tmp_path, monkeypatch):
    """Between reading the path /proc names for the copied file and linking it, another file
    with the same bytes, size and mtime took that path: the link to it is removed again."""
    old, decoy = tmp_path / "old", tmp_path / "decoy"
    data = os.urandom(8192)
    old.write_bytes(data)
    decoy.write_bytes(data)
    read = os.stat(str(old))
    os.utime(str(decoy), ns=(read.st_atime_ns, read.st_mtime_ns))
    readlink = os.readlink
    with monkeypatch.context() as patched:
        patched.setattr(os, "readlink", lambda path: str(decoy)
                        if str(path).startswith("/proc/self/fd/") else readlink(path))
        path, archive = _written(tmp_path, "new.tar.gz", [("copy", 0, 8192)])
    assert archive.linked is None and os.stat(str(path)).st_nlink == 1
    assert os.stat(str(decoy)).st_nlink == 1 and os.stat(str(old)).st_nlink == 1
    assert path.read_bytes() == data and _checksum_is_right(path)


@pytest.mark.parametrize("steps, expected", [
    # A prefix of the file, then something else: what was held back is written first.
    ([("copy", 0, 5000), ("write", b"new")], lambda data: data[:5000] + b"new"),
    ([("copy", 0, 5000), ("copy", 7000, 100)], lambda data: data[:5000] + data[7000:7100]),
    ([("copy", 0, 5000), ("write", b"\0" * 10)], lambda data: data[:5000] + b"\0" * 10),
    # All of it but one byte, or all of it and more: not that file.
    ([("copy", 0, 8191)], lambda data: data[:8191]),
    ([("copy", 0, 8192), ("write", b"x")], lambda data: data + b"x"),
    ([("write", b"first"), ("copy", 0, 8192)], lambda data: b"first" + data),
])
def test_an_archive_that_differs_from_the_file_it_copies_from_is_written_out(
        tmp_path, steps, expected):
    data = os.urandom(8192)
    (tmp_path / "old").write_bytes(data)
    path, archive = _written(tmp_path, "new.tar.gz", steps)
    assert archive.linked is None and os.stat(str(path)).st_nlink == 1
    assert path.read_bytes() == expected(data) and _checksum_is_right(path)


def test_where_the_kernel_cannot_copy_the_bytes_are_written(tmp_path, monkeypatch):
    """No copy_file_range between these files (an old kernel, another filesystem): what was
    held back is read and written, and so is every later copy, in pieces of at most 1 MiB."""
    def refused(*arguments):
        raise OSError(errno.EXDEV, "Invalid cross-device link")
    monkeypatch.setattr(os, "copy_file_range", refused)
    data = os.urandom(3 * 1024 * 1024 + 5)
    (tmp_path / "old").write_bytes(data)
    path, archive = _written(tmp_path, "new.tar.gz", [
        ("copy", 0, 2 * 1024 * 1024 + 3), ("write", b"other"), ("copy", 7, len(data) - 7)])
    assert archive.linked is None
    assert path.read_bytes() == data[:2 * 1024 * 1024 + 3] + b"other" + data[7:]
    assert _checksum_is_right(path)


@pytest.mark.parametrize("link_identical", [True, False])
def test_a_file_written_to_while_it_was_held_back_is_never_published(tmp_path,
                                                                    link_identical):
    old = tmp_path / "old"
    data = os.urandom(8192)
    old.write_bytes(data)
    descriptor = os.open(str(old), os.O_RDONLY)
    try:
        with AtomicArchive(str(tmp_path / "new.tar.gz")) as archive:
            archive.output.copy(descriptor, 0, data)  # checked as read; not written yet
            time.sleep(0.01)  # a ctime that can differ
            with open(str(old), "r+b") as file:  # then bit rot, or a bad process, writes
                file.write(b"X")
            with pytest.raises(BackupError, match="changed while it was read"):
                archive.publish(checksum=True, link_identical=link_identical)
    finally:
        os.close(descriptor)
    assert sorted(os.listdir(str(tmp_path))) == ["old"]


def test_failure_before_publish_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError):
        with AtomicArchive(str(tmp_path / "x.tar.gz")) as archive:
            archive.file.write(b"half")
            raise RuntimeError("boom")
    assert os.listdir(str(tmp_path)) == []


def test_backup_folder_is_created_private(tmp_path):
    folder = tmp_path / "new" / "backups"
    old_umask = os.umask(0)
    try:
        files.ensure_backup_dir(str(folder))
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(str(folder)).st_mode) == 0o700
    os.chmod(str(folder), 0o755)
    files.ensure_backup_dir(str(folder))
    assert stat.S_IMODE(os.stat(str(folder)).st_mode) == 0o755  # the single scripts leave it
    files.ensure_backup_dir(str(folder), enforce_mode=True)
    assert stat.S_IMODE(os.stat(str(folder)).st_mode) == 0o700  # backup_all sets it
    (tmp_path / "file").write_text("x")
    with pytest.raises(BackupError, match="not a folder"):
        files.ensure_backup_dir(str(tmp_path / "file"))


def test_only_dead_leftovers_are_removed(tmp_path):
    with AtomicArchive(str(tmp_path / "live.tar.gz")) as live:
        dead = tmp_path / (files.WORK_PREFIX + "dead.part")
        dead.write_bytes(b"left by a killed run")
        dead_folder = tmp_path / (files.WORK_PREFIX + "transfer-old")
        (dead_folder / "sub").mkdir(parents=True)
        legacy_lock = tmp_path / (files.LOCK_NAME + "-volume-owui-data")  # nobody holds it
        legacy_lock.write_text("123\n")
        keep = ["notes.txt", "a__20260118T120000Z.tar.gz", files.LOCK_NAME]
        for name in keep:
            (tmp_path / name).write_text("keep")
        removed = files.remove_stale_work_files(str(tmp_path))
        assert sorted(removed) == sorted([str(dead), str(dead_folder), str(legacy_lock)])
        assert sorted(os.listdir(str(tmp_path))) == sorted(keep + [os.path.basename(
            live.temp_path)])


# --- backup_all settings, retention, lock -------------------------------------------

def test_config_defaults_and_overrides():
    settings = Config.from_environment({}, backup_all=True)
    assert settings.backup_dir == "/srv/ai-stack/backups" and not settings.backup_dir_configured
    assert settings.volumes == ["owui-data", "tm-data", "context6-data", "context6-cache",
                                "qdrant-data"]
    assert (settings.retention_days, settings.min_keep, settings.consistency) == (14, 3, "auto")
    assert settings.output_root == config.DEFAULT_OUTPUT_ROOT
    assert (settings.helper_image, settings.gzip_level) == ("alpine:3.20", 6)
    assert settings.threads == config.default_threads() >= 1
    settings = Config.from_environment(
        {"OPEN_WEBUI_VOLUME": "webui", "TOOL_TM_VOLUME": "tm", "STOP_CONTAINERS": "1",
         "RETENTION_DAYS": "0", "BACKUP_DIR": " relative/dir ", "BACKUP_HELPER_IMAGE": " img ",
         "BACKUP_GZIP_LEVEL": "1", "BACKUP_THREADS": "3"}, backup_all=True)
    assert settings.volumes[:2] == ["webui", "tm"] and settings.consistency == "stop"
    assert settings.backup_dir == os.path.abspath("relative/dir") and settings.backup_dir_configured
    assert (settings.helper_image, settings.gzip_level, settings.threads) == ("img", 1, 3)
    assert Config.from_environment({"VOLUMES": " a, b  c,,d "}, backup_all=True).volumes == \
        ["a", "b", "c", "d"]
    assert Config.from_environment({"OUTPUT_ROOT": ""}, backup_all=True).output_root == ""
    for bad in ({"RETENTION_DAYS": "-1"}, {"RETENTION_DAYS": "two"},
                {"RETENTION_MIN_KEEP": "0"}, {"STOP_CONTAINERS": "maybe"},
                {"BACKUP_GZIP_LEVEL": "0"}, {"BACKUP_GZIP_LEVEL": "fast"},
                {"BACKUP_THREADS": "0"}, {"BACKUP_THREADS": "-2"}):
        with pytest.raises(ConfigError, match=next(iter(bad))):
            Config.from_environment(bad, backup_all=True)
    # Consistency: auto by default, STOP_CONTAINERS=1 makes it stop, entries per volume win.
    assert Config.from_environment({}, backup_all=True).consistency_for("owui-data") == "auto"
    stopping = Config.from_environment({"STOP_CONTAINERS": "1",
                                        "BACKUP_CONSISTENCY": "owui-data=sqlite"}, backup_all=True)
    assert (stopping.consistency_for("owui-data"), stopping.consistency_for("x")) == \
        ("sqlite", "stop")
    mixed = Config.from_environment({"BACKUP_CONSISTENCY": " live, qdrant-data=stop ",
                                     "STOP_CONTAINERS": "1"}, backup_all=True)
    assert (mixed.consistency_for("qdrant-data"), mixed.consistency_for("tm-data")) == \
        ("stop", "live")
    for bad, words in [("fast", "'fast' is not a consistency mode"),
                       ("a=stop b=halt", "'halt' is not a consistency mode"),
                       ("=stop", "names no volume"),
                       ("live stop", "more than one default mode")]:
        with pytest.raises(ConfigError, match=words):
            Config.from_environment({"BACKUP_CONSISTENCY": bad}, backup_all=True)
    # backup_all's own variables never stop a single backup or restore.
    single = Config.from_environment({"RETENTION_DAYS": "two", "VOLUMES": "x"})
    assert single.volumes is None and single.retention_days is None


def _archive(folder, source, days_old, now):
    name = archive_name(source, utc_timestamp(now - days_old * 86400))
    path = folder / name
    path.write_bytes(b"x")
    return str(path)


def retention_plan(folder, sources, days, min_keep, now):
    return retention.doomed(folder, sources, retention.Policy(days, min_keep), now)


def test_retention_plan(tmp_path):
    now = time.time()
    old = [_archive(tmp_path, "owui-data", days, now) for days in (30, 20, 16, 15)]
    recent = [_archive(tmp_path, "owui-data", days, now) for days in (1, 2)]
    failed_source = [_archive(tmp_path, "tm-data", days, now) for days in (40, 30, 20, 10)]
    few = [_archive(tmp_path, "qdrant-data", days, now) for days in (100, 90)]
    unknown = _archive(tmp_path, "retired-volume", 100, now)
    sub = tmp_path / "sub"
    sub.mkdir()
    nested = _archive(sub, "owui-data", 100, now)
    lookalike = tmp_path / "owui-data__20200101T000000Z.tar.gz.bak"
    lookalike.write_bytes(b"x")
    os.symlink(old[0], str(tmp_path / "owui-data__20190101T000000Z.tar.gz"))
    # Age comes from the name, not the mtime.
    os.utime(recent[0], (now - 400 * 86400, now - 400 * 86400))
    plan = retention_plan(str(tmp_path), {"owui-data", "qdrant-data"}, 14, 3, now)
    assert plan == old[:3]  # 15 days old is kept as one of the 3 newest
    assert retention_plan(str(tmp_path), {"owui-data"}, 14, 1, now) == old
    assert retention_plan(str(tmp_path), {"owui-data"}, 40, 1, now) == []
    for kept in failed_source + few + [unknown, nested]:
        assert kept not in plan


def test_failed_copies_go_after_retention_days_even_when_few(tmp_path):
    now = time.time()
    old = _archive(tmp_path, "owui-data", 30, now)
    young = _archive(tmp_path, "owui-data", 2, now)
    other = _archive(tmp_path, "retired", 30, now)
    for path in (old, young, other):
        os.rename(path, path + ".failed-verification")
    plan = retention.failed_copies(str(tmp_path), {"owui-data"}, 14, now)
    assert plan == [old + ".failed-verification"]  # not the young one, not another source's
    assert retention_plan(str(tmp_path), {"owui-data"}, 14, 0, now) == []  # never backups


def test_lock_is_exclusive_and_names_the_holder(tmp_path):
    with backup_all_lock(str(tmp_path)):
        with pytest.raises(Locked, match="PID %d" % os.getpid()) as raised:
            with backup_all_lock(str(tmp_path)):
                pass
        assert raised.value.exit_code == 75
        result = subprocess.run([sys.executable, os.path.join(SCRIPTS, "backup_all.py")],
                                env=dict(os.environ, BACKUP_DIR=str(tmp_path),
                                         VOLUMES="aisb-test-never-created", OUTPUT_ROOT=""),
                                capture_output=True, timeout=60)
        assert result.returncode == 75
        assert b"(PID %d) holds the lock" % os.getpid() in result.stderr
    with pytest.raises(RuntimeError):
        with backup_all_lock(str(tmp_path)):
            raise RuntimeError("a failing run")
    with backup_all_lock(str(tmp_path)):  # released on every exit path
        descriptor = os.open(str(tmp_path / files.LOCK_NAME), os.O_RDONLY)
        with pytest.raises(BlockingIOError):
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.close(descriptor)


def test_only_vanished_files_are_forgiven():
    from ai_stack_backup.capture import vanished_files
    delayed = "tar: error exit delayed from previous errors"
    assert vanished_files(1, ["tar: ./a-journal: No such file or directory",
                              "tar: can't open './b-wal': No such file or directory",
                              delayed]) == ["./a-journal", "./b-wal"]
    assert vanished_files(1, ["tar: ./x: Permission denied", delayed]) is None
    assert vanished_files(1, ["tar: ./a: No such file or directory",
                              "tar: ./x: Permission denied"]) is None
    assert vanished_files(2, ["tar: ./a: No such file or directory"]) is None
    assert vanished_files(1, [delayed]) is None and vanished_files(1, None) is None


def test_a_drill_tells_members_apart_by_every_field_a_restore_sets():
    """A restore that got one thing wrong (a mode, an owner, an mtime, a symlink's target,
    the content) must not pass the drill's comparison."""
    from ai_stack_backup.drill import _fingerprint
    from ai_stack_backup.tarstream import DIRECTORY, FILE, SYMLINK, Member

    def fingerprint(kind=FILE, content=b"data", **fields):
        member = Member(b"./x", kind, **dict(dict(mode=0o644, uid=1000, gid=1000,
                                                  mtime=1700000000, size=4), **fields))
        return _fingerprint(member, hashlib.sha256(content) if kind == FILE else None, None)
    variants = [fingerprint(), fingerprint(mode=0o600), fingerprint(uid=0), fingerprint(gid=0),
                fingerprint(mtime=1700000001), fingerprint(size=5), fingerprint(content=b"date"),
                fingerprint(DIRECTORY, size=0), fingerprint(SYMLINK, size=0, linkname=b"a"),
                fingerprint(SYMLINK, size=0, linkname=b"b")]
    assert len(set(variants)) == len(variants)
    assert fingerprint() == fingerprint()


def test_a_drill_names_what_differs(tmp_path, monkeypatch):
    from ai_stack_backup.drill import _Comparison
    monkeypatch.setattr(_Comparison, "BATCH", 2)  # the written batches and the pending ones
    one, other = b"\x01" * 16, b"\x02" * 16
    paths = [b"", b"a", b"b", b"c"]

    def compared(found):
        with _Comparison(str(tmp_path)) as comparison:
            for path in paths:
                comparison.expect(path, one)
            for path, fingerprint in found:
                comparison.take(path, fingerprint)
            return comparison.difference()
    assert compared([(path, one) for path in paths]) is None
    # A hard link to a file already seen takes that file's fingerprint, on either side.
    with _Comparison(str(tmp_path)) as comparison:
        for path in (b"f", b"g", b"h"):
            comparison.expect(path, one)
        comparison.expect(b"link", comparison.expected_fingerprint(b"f"))
        for path in (b"f", b"g", b"h"):
            comparison.take(path, one)
        comparison.take(b"link", comparison.fingerprint_of(b"f"))
        assert comparison.difference() is None and comparison.members == 4
    assert os.listdir(str(tmp_path)) == []  # the manifest's file goes with it
    assert compared([(b"", one), (b"new", one), (b"b", other), (b"c", one)]) == (
        "the restored tree differs: 1 missing (a); 1 not in the archive (new); 1 different (b)")
    many = [(b"x%d" % index, one) for index in range(5)]
    assert compared([(path, one) for path in paths] + many).endswith(
        "5 not in the archive (x0, x1, x2, …)")


def test_skip_unchanged_is_backup_alls_default_only():
    assert Config.from_environment({}, backup_all=True).skip_unchanged is True
    assert Config.from_environment({"BACKUP_SKIP_UNCHANGED": "0"},
                                   backup_all=True).skip_unchanged is False
    assert Config.from_environment({}).skip_unchanged is False  # the runbook's single backups
    with pytest.raises(ConfigError, match="BACKUP_SKIP_UNCHANGED must be 1 or 0"):
        Config.from_environment({"BACKUP_SKIP_UNCHANGED": "maybe"}, backup_all=True)


def test_a_volume_probe_reads_free_space_size_contents_and_top_folder():
    from ai_stack_backup.transfer import _read_probe
    lines = (b"/dev/vda 41152736 20576368 18463364  53% /volume\n"
             b"3000\t/volume\n1\n0 1000 750 1764950400\n")
    probe = _read_probe(lines + b"/dev/vda 2621440 848140 1773300 33% /volume\n", "measuring")
    assert (probe.free, probe.size, probe.held, probe.empty, probe.root, probe.inodes) == (
        18463364 * 1024, 41152736 * 1024, 3000 * 1024, False, (0, 1000, 0o750, 1764950400),
        (1773300, 2621440))
    assert _read_probe(lines, "measuring").inodes is None  # a df without -i


def test_a_backup_takes_only_mktemps_names_as_contents_a_restore_set_aside(tmp_path):
    """The helper names whatever folder at the top matches the prefix; only the prefix and
    mktemp's six letters or digits make a folder a restore left."""
    from ai_stack_backup import transfer
    folder = transfer.TransferFolder(str(tmp_path))
    try:
        planned = transfer.PlannedStream(folder, None, "backing up volume v")
        assert planned.set_aside() == []  # a helper that ended before it looked
        with open(folder.file(transfer.SET_ASIDE), "wb") as file:
            file.write(b".ai_stack_backup-old-Ab12Cd\n.ai_stack_backup-old-*\n"
                       b".ai_stack_backup-old-Ab12C\n.ai_stack_backup-old-Ab12Cde\n"
                       b".ai_stack_backup-old-Ab1-Cd\n.ai_stack_backup-old-Ab\xff2Cd\n"
                       b"x.ai_stack_backup-old-Ab12Cd\n.ai_stack_backup-old-0000zZ\n")
        assert planned.set_aside() == [".ai_stack_backup-old-Ab12Cd",
                                       ".ai_stack_backup-old-0000zZ"]
        assert transfer.SET_ASIDE_PREFIX + "XXXXXX" in transfer.SET_ASIDE_SCRIPT
    finally:
        folder.close()


@pytest.mark.parametrize("free, size, staged, beside", [
    ((1 << 30) + (10 << 20), 0, 0, True),  # the archive's 10 MiB and the 1 GiB reserve
    ((1 << 30) + (10 << 20) - 1, 0, 0, False),
    ((1 << 30) + (20 << 20), 0, 10 << 20, True),  # the staged archive counts as taken
    ((1 << 30) + (20 << 20), 0, (10 << 20) + 1, False),
    ((2 << 30) + (10 << 20), 40 << 30, 0, True),  # 5% of a 40 GiB filesystem: 2 GiB reserve
    ((2 << 30) + (10 << 20), 41 << 30, 0, False),
])
def test_the_room_beside_the_old_contents_leaves_the_reserve_and_the_staged_archive(
        free, size, staged, beside):
    from ai_stack_backup.archive import ArchiveSummary
    from ai_stack_backup.transfer import VolumeProbe, space_check
    probe = VolumeProbe(free, 5 << 30, False, (0, 0, 0o755, 0), size, (10 ** 6, 2 * 10 ** 6))
    summary = ArchiveSummary(256, (10 << 20) - 256 * 4096, 0, 0)
    assert (space_check(probe, "owui-data", summary, staged) >= 0) is beside


@pytest.mark.parametrize("inodes, beside", [
    ((1255, 20000), False),  # 256 members, and 5% of the inodes (1000) kept free
    ((1256, 20000), True),
    ((0, 0), True),  # inodes made as needed (btrfs says 0 of 0)
    (None, False),  # not known: the volume is emptied first
])
def test_the_room_beside_the_old_contents_counts_inodes(inodes, beside):
    from ai_stack_backup.archive import ArchiveSummary
    from ai_stack_backup.transfer import VolumeProbe, space_check
    probe = VolumeProbe(8 << 30, 1 << 20, False, (0, 0, 0o755, 0), 10 << 30, inodes)
    summary = ArchiveSummary(256, 10 << 20, 0, 0)
    assert (space_check(probe, "owui-data", summary) >= 0) is beside


@pytest.mark.parametrize("free, held, data_bytes, members, room", [
    (10 << 20, 0, 9 << 20, 256, True),  # 9 MiB and 1 MiB of blocks: just fits
    (10 << 20, 0, 9 << 20, 257, False),  # one member more: each takes a block at least
    (5 << 20, 5 << 20, 10 << 20, 0, True),  # what the volume holds goes first: counted free
    (5 << 20, 5 << 20, 10 << 20, 1, False),
])
def test_a_restore_needs_room_for_the_data_and_a_block_a_member(free, held, data_bytes,
                                                               members, room):
    from ai_stack_backup.archive import ArchiveSummary
    from ai_stack_backup.errors import NoRoom
    from ai_stack_backup.transfer import VolumeProbe, space_check
    probe = VolumeProbe(free, held, held == 0, (0, 0, 0o755, 0))
    summary = ArchiveSummary(members, data_bytes, 0, 0)
    if room:
        space_check(probe, "owui-data", summary)
    else:
        with pytest.raises(NoRoom, match=r"volume owui-data has room for about 10 MiB .* "
                                         r"nothing was changed"):
            space_check(probe, "owui-data", summary)
