"""Blocked archives built from the previous one's bytes: each night's archive is complete,
what did not change is copied, and every reader still reads it."""

import glob
import gzip
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import zlib

import pytest

import testkit
from ai_stack_backup import blocked, gzipstream, names
from ai_stack_backup.cli import backup_all_main, backup_docker_volume_main, \
    restore_docker_volume_main, verify_backup_main
from conftest import SCRIPTS

pytestmark = pytest.mark.engine

SMALL_FILES = 700  # about 3 MiB of tar: several run members
LARGE = 6 * blocked.PIECE_SIZE + 1234  # a head member and seven pieces


def text(seed, size):
    generator = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"%d" % seed, b"{\"k\": 1}", b"\n"]
    out = bytearray()
    while len(out) < size:
        out += generator.choice(words) + b" "
    return bytes(out[:size])


def build_tree(root):
    """A volume's worth of small files, a large database-like file, links and odd entries."""
    root = str(root)
    os.makedirs(os.path.join(root, "small", "deeper"))
    for index in range(SMALL_FILES):
        folder = "small/deeper" if index % 3 == 0 else "small"
        testkit._write(os.path.join(root, folder, "f%04d.txt" % index), text(index, 4000))
    generator = random.Random(11)
    testkit._write(os.path.join(root, "big.db"),
                   bytes(generator.getrandbits(8) for _ in range(4096)) * (LARGE // 4096) +
                   text(99, LARGE % 4096), owner=(1000, 1000), mode=0o600)
    os.symlink("small/f0001.txt", os.path.join(root, "link"))
    os.link(os.path.join(root, "small", "f0002.txt"), os.path.join(root, "hard"))
    os.makedirs(os.path.join(root, "empty"))
    testkit._write(os.path.join(root, "ünïcode name.txt"), b"names are bytes\n")
    for folder, folders, files in os.walk(root, topdown=False):
        for name in files + folders:
            os.utime(os.path.join(folder, name), (testkit.T0, testkit.T0), follow_symlinks=False)
    os.utime(root, (testkit.T0, testkit.T0))


@pytest.fixture
def stocked_volume(helper_env, make_volume, tmp_path):
    source = tmp_path / "tree"
    source.mkdir()
    build_tree(source)
    volume = make_volume()
    testkit.fill_volume(volume, str(source))
    testkit.next_second()  # nothing may change in the second the first listing begins
    return volume


def in_volume(image, volume, script):
    testkit.docker("run", "--rm", "--network", "none", "-v", volume + ":/v", image,
                   "sh", "-euc", script)


def backup(volume, folder, *extra):
    assert backup_docker_volume_main([volume, str(folder), "--quiet"] + list(extra)) == 0
    return testkit.archives_in(folder)[-1]


def record_of(path):
    with open(path + ".listing") as file:
        return json.load(file)


def copied_and_written(log, first):
    """The MiB copied from ``first`` and the MiB read and compressed, as the log says."""
    found = re.search(r"([0-9.]+) MiB copied from %s, ([0-9.]+) MiB read and compressed"
                      % re.escape(first), log)
    return (float(found.group(1)), float(found.group(2))) if found else (0.0, None)


def restored_state(make_volume, archive):
    volume = make_volume()
    assert restore_docker_volume_main([volume, archive, "--force", "--quiet"]) == 0
    return testkit.volume_state(volume)


CHANGES = {
    # name: (script in the volume, the archive entries it must change)
    "content, size and mtime kept": (
        "printf '%04000d' 7 > /v/small/f0100.txt && touch -d @1000000000 /v/small/f0100.txt",
        {"./small/f0100.txt"}),
    "mode": ("chmod 600 /v/small/f0101.txt", {"./small/f0101.txt"}),
    "owner": ("chown 1001:1001 /v/small/f0104.txt", {"./small/f0104.txt"}),
    "rename": ("mv /v/small/f0200.txt /v/small/g0200.txt",
               {"./small", "./small/f0200.txt", "./small/g0200.txt"}),
    "delete": ("rm /v/small/deeper/f0300.txt", {"./small/deeper", "./small/deeper/f0300.txt"}),
    "new file": ("echo new > /v/small/new.txt", {"./small", "./small/new.txt"}),
    "symlink target": ("ln -sfn small/f0005.txt /v/link && touch -h -d @1000000000 /v/link",
                       {".", "./link"}),  # replacing the link changes its folder
    "large file changed in one place": (
        "printf 'CHANGED' | dd of=/v/big.db bs=1 seek=3000000 conv=notrunc 2>/dev/null",
        {"./big.db"}),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_change_shows_up_in_the_next_archive_and_nowhere_else(
        helper_env, stocked_volume, make_volume, tmp_path, change, capsys):
    folder = tmp_path / "backups"
    first = backup(stocked_volume, folder)
    script, changed = CHANGES[change]
    in_volume(helper_env, stocked_volume, script)
    testkit.next_second()
    capsys.readouterr()
    second = backup(stocked_volume, folder)
    log = capsys.readouterr().err
    before, after = testkit.archive_manifest(first), testkit.archive_manifest(second)
    differing = {name for name in set(before) | set(after) if before.get(name) != after.get(name)}
    assert differing == changed
    assert restored_state(make_volume, second) == testkit.volume_state(stocked_volume)
    # What did not change was copied, not read: at most the run members the change touched
    # (a folder's line, the file's own, a new name's place) were read again.
    copied, written = copied_and_written(log, first)
    assert copied > 5 and written <= 3 * blocked.RUN_SIZE / (1 << 20) + 0.1, log
    if change == "large file changed in one place":
        pieces = [block for block in record_of(second)["blocks"] if block[0] == "piece"]
        old = {(block[2], block[5]) for block in record_of(first)["blocks"]}
        fresh = [block for block in pieces if (block[2], block[5]) not in old]
        assert len(pieces) == 7 and len(fresh) == 1


def test_large_members_of_a_reused_archive_stay_on_block_boundaries(helper_env, stocked_volume,
                                                                     tmp_path):
    folder = tmp_path / "backups"
    first = backup(stocked_volume, folder)
    in_volume(helper_env, stocked_volume, "echo x >> /v/small/f0009.txt")
    testkit.next_second()
    second = backup(stocked_volume, folder)
    for path in (first, second):
        blocks = record_of(path)["blocks"]
        assert [block[0] for block in blocks][-1] == "end"
        with open(path, "rb") as file:
            content = sum(len(piece) for piece in gzipstream.iter_gunzip(file.read))
        assert sum(block[4] for block in blocks) == content
        for _, offset, length, crc, size, bytes_crc, _ in blocks:
            with open(path, "rb") as file:
                file.seek(offset)
                member = file.read(length)
            content = gzip.decompress(member)
            assert zlib.crc32(member) == bytes_crc and len(content) == size
            assert zlib.crc32(content) == crc
            if length >= gzipstream.ALIGN_FROM:
                assert offset % 4096 == 0 and length % 4096 == 0


def test_every_reader_restores_an_archive_built_from_reused_bytes(
        helper_env, stocked_volume, make_volume, tmp_path, capsys):
    folder = tmp_path / "backups"
    first = backup(stocked_volume, folder)
    in_volume(helper_env, stocked_volume, "echo more >> /v/small/f0400.txt && "
              "printf 'X' | dd of=/v/big.db bs=1 seek=10 conv=notrunc 2>/dev/null")
    testkit.next_second()
    capsys.readouterr()
    second = backup(stocked_volume, folder)
    copied, written = copied_and_written(capsys.readouterr().err, first)
    assert copied > 5 and written < 3
    expected = testkit.volume_state(stocked_volume)
    subprocess.run(["gzip", "-t", second], check=True)
    # The old procedure: busybox tar in a helper container.
    old_way = make_volume()
    testkit.docker("run", "--rm", "--network", "none", "-v", old_way + ":/volume",
                   "-v", str(folder) + ":/backup:ro", helper_env, "sh", "-c",
                   "cd /volume && tar -xzf /backup/%s" % os.path.basename(second))
    # busybox tar sets no symlink's mtime, and a folder's only before its content arrives:
    # the old procedure never kept those, with any archive.
    assert as_the_old_procedure_keeps(testkit.volume_state(old_way)) == \
        as_the_old_procedure_keeps(expected)
    # GNU tar on the host.
    gnu = tmp_path / "gnu"
    gnu.mkdir()
    subprocess.run(["tar", "-xzpf", second, "--numeric-owner", "-C", str(gnu)], check=True)
    assert testkit.tree_state(gnu) == expected
    # Python's tarfile.
    python = tmp_path / "python"
    with tarfile.open(second) as archive:
        archive.extractall(str(python), numeric_owner=True)
    assert without_symlink_mtimes(testkit.tree_state(python)) == \
        without_symlink_mtimes(expected)  # tarfile sets no symlink's mtime
    # Ours: verify and restore.
    capsys.readouterr()
    assert verify_backup_main([second]) == 0
    assert "OK" in capsys.readouterr().out
    assert restored_state(make_volume, second) == expected


def without_symlink_mtimes(state):
    return {path: entry[:4] + (None if entry[0] == "symlink" else entry[4],) + entry[5:]
            for path, entry in state.items()}


def new_file_and_backup(image, volume, folder, capsys):
    """Add /new.txt to the volume and back it up into ``folder``; give (archive, log)."""
    in_volume(image, volume, "echo new > /v/new.txt")
    testkit.next_second()
    capsys.readouterr()
    archive = backup(volume, folder)
    return archive, capsys.readouterr().err


def as_the_old_procedure_keeps(state):
    return {path: entry[:4] + (None if entry[0] in ("dir", "symlink") else entry[4],) +
            entry[5:] for path, entry in state.items()}


def test_a_flipped_byte_in_the_previous_archive_is_never_copied(
        helper_env, stocked_volume, make_volume, tmp_path, capsys):
    folder = tmp_path / "backups"
    first = backup(stocked_volume, folder)
    runs = [block for block in record_of(first)["blocks"] if block[0] == "run"]
    target = runs[len(runs) // 2]
    before = os.stat(first)
    with open(first, "r+b") as file:  # bit rot inside a member that will be reused
        file.seek(target[1] + target[2] // 2)
        byte = file.read(1)
        file.seek(-1, os.SEEK_CUR)
        file.write(bytes([byte[0] ^ 0x10]))
    os.utime(first, ns=(before.st_atime_ns, before.st_mtime_ns))
    second, log = new_file_and_backup(helper_env, stocked_volume, folder, capsys)
    assert "%s is not the file it was when written" % first in log
    assert "MiB copied" not in log
    assert verify_backup_main([second]) == 0
    assert restored_state(make_volume, second) == testkit.volume_state(stocked_volume)


def test_an_archive_without_a_member_record_gives_nothing_to_reuse(
        helper_env, stocked_volume, tmp_path, capsys):
    """An archive of an earlier version (one gzip member, no record of its members) is a
    previous archive like any other: the next backup is complete and reads everything."""
    folder = tmp_path / "backups"
    first = backup(stocked_volume, folder)
    saved = record_of(first)
    del saved["blocks"]
    saved["blocked"] = None
    os.chmod(first + ".listing", 0o600)
    with open(first + ".listing", "w") as file:
        json.dump(saved, file)
    second, log = new_file_and_backup(helper_env, stocked_volume, folder, capsys)
    assert "%s was written without a record of its members" % first in log
    assert "MiB copied" not in log
    assert set(testkit.archive_manifest(second)) == \
        set(testkit.archive_manifest(first)) | {"./new.txt"}


def test_hard_links_split_over_tar_batches_stay_links(helper_env, make_volume, tmp_path):
    """Many long names make xargs run tar more than once; a file's second name in a later
    batch is still a link to its first, not a second copy."""
    source = tmp_path / "tree"
    source.mkdir()
    long = "n" * 200
    for index in range(1500):  # about 300 KiB of names: several tar batches
        testkit._write(str(source / ("%s-%04d" % (long, index))), b"%d\n" % index)
    os.link(str(source / ("%s-0000" % long)), str(source / "zz-last-name"))
    volume = make_volume()
    testkit.fill_volume(volume, str(source))
    testkit.next_second()
    archive = backup(volume, tmp_path / "backups")
    with tarfile.open(archive) as opened:
        last = opened.getmember("./zz-last-name")
        assert last.islnk() and last.linkname == "./%s-0000" % long
    restored = restored_state(make_volume, archive)
    assert restored == testkit.volume_state(volume)
    assert restored[b"zz-last-name"][6] is not None  # one inode, two names


def test_fourteen_nights_on_xfs_with_retention_each_restore_exactly(
        helper_env, make_volume, xfs_folder, tmp_path, monkeypatch):
    """Fourteen small-change nights into a folder on XFS, where copied members share blocks;
    retention deletes the oldest as it goes, and every archive kept restores exactly."""
    source = tmp_path / "source"
    source.mkdir()
    build_tree(source)
    volume = make_volume()
    testkit.fill_volume(volume, str(source))
    os.sync()
    empty = shutil.disk_usage(str(xfs_folder)).used
    folder = xfs_folder / "backups"
    for name, setting in (("BACKUP_DIR", str(folder)), ("VOLUMES", volume),
                          ("OUTPUT_ROOT", ""), ("RETENTION_DAYS", "0"),
                          ("RETENTION_MIN_KEEP", "5"), ("BACKUP_SKIP_UNCHANGED", "0")):
        monkeypatch.setenv(name, setting)
    states = {}
    for night in range(14):
        in_volume(helper_env, volume, "echo night %d >> /v/small/f%04d.txt" % (night, night * 7))
        testkit.next_second()
        assert backup_all_main(["--quiet"]) == 0
        states[testkit.archives_in(folder)[-1]] = testkit.volume_state(volume)
    kept = testkit.archives_in(folder)
    assert len(kept) == 5
    for archive in kept:
        assert restored_state(make_volume, archive) == states[archive]
    os.sync()
    used = shutil.disk_usage(str(xfs_folder)).used - empty
    sizes = sum(os.path.getsize(path) for path in kept)
    # Five complete archives sharing most of their blocks: the disk holds about one of them
    # and each night's change, not five copies.
    assert used < 0.4 * sizes, (used, sizes)


def test_a_signal_during_assembly_leaves_no_temp_file_and_no_new_name(
        helper_env, stocked_volume, tmp_path):
    folder = tmp_path / "backups"
    first = backup(stocked_volume, folder)
    before = sorted(os.listdir(str(folder)))
    in_volume(helper_env, stocked_volume, "echo more >> /v/small/f0003.txt")
    testkit.next_second()
    image = testkit.build_variant_image("hanging", testkit.HANGING_TAR)
    process = subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, "backup_docker_volume.py"), stocked_volume,
         str(folder), "--quiet"],
        env=dict(os.environ, BACKUP_HELPER_IMAGE=image), stderr=subprocess.PIPE)
    # The plan is in and members are being copied; the helper's tar never sends its part.
    testkit.wait_for(lambda: glob.glob(os.path.join(
        os.environ["BACKUP_DIR"], ".ai_stack_backup-transfer-*", "plan")) and any(
        name.endswith(".part") for name in os.listdir(str(folder))),
        "the assembly to be under way")
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=60)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert sorted(os.listdir(str(folder))) == before
    assert testkit.archives_in(folder) == [first]
    testkit.wait_for(lambda: not testkit.helper_containers(stocked_volume),
                     "the helper container to go with the backup")


# A database of mostly still pages (6 MiB of blobs) and a table one row of which an app
# updates all the time, through SQLite, in its own container.
STILL_DATABASE = r'''
import sqlite3, sys
db = sqlite3.connect(sys.argv[1])
db.execute("CREATE TABLE still (id INTEGER PRIMARY KEY, payload BLOB)")
db.execute("CREATE TABLE busy (id INTEGER PRIMARY KEY, counter INTEGER)")
db.execute("INSERT INTO busy VALUES (1, 0)")
db.executemany("INSERT INTO still VALUES (?, randomblob(3000))", [(i,) for i in range(2000)])
db.commit()
'''
BUSY_APP = r'''
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], timeout=60)
print("ready", flush=True)
while True:
    db.execute("UPDATE busy SET counter = counter + 1 WHERE id = 1")
    db.commit()
    time.sleep(0.05)
'''


def test_a_snapshotted_database_is_compared_piece_by_piece(helper_env, make_volume, tmp_path,
                                                           capsys):
    """consistency sqlite: the snapshot is a new file every night, yet only the pieces with
    changed pages (the header page, the busy row's) are compressed; the rest is copied."""
    app_image = testkit.build_app_image()
    volume = make_volume()
    testkit.docker("run", "--rm", "--network", "none", "-v", volume + ":/data", app_image,
                   "python3", "-c", STILL_DATABASE, "/data/app.db")
    app = "aisb-busy-%s" % volume[len("aisb-test-"):]
    testkit.docker("run", "-d", "--name", app, "--network", "none", "-v", volume + ":/data",
                   app_image, "python3", "-c", BUSY_APP, "/data/app.db")
    try:
        testkit.wait_for(lambda: "ready" in testkit.docker("logs", app), "the app to write")
        folder = tmp_path / "backups"
        first = backup(volume, folder, "--consistency", "sqlite")
        testkit.next_second()
        capsys.readouterr()
        second = backup(volume, folder, "--consistency", "sqlite")
        log = capsys.readouterr().err
    finally:
        subprocess.run(["docker", "rm", "-f", app], capture_output=True)
    copied, written = copied_and_written(log, first)
    assert copied >= 3 and written <= 3, log
    pieces = [block for block in record_of(second)["blocks"]
              if block[0] == "piece" and bytes.fromhex(block[6][0]) == b"app.db"]
    old = {(block[2], block[5]) for block in record_of(first)["blocks"]}
    assert len(pieces) >= 6 and sum((block[2], block[5]) in old for block in pieces) >= 3
    for archive in (first, second):
        into = tmp_path / os.path.basename(archive)
        with tarfile.open(archive) as opened:
            assert "./app.db-journal" not in opened.getnames()
            opened.extractall(str(into))
        import sqlite3
        connection = sqlite3.connect(str(into / "app.db"))
        try:
            assert connection.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
            assert connection.execute("SELECT count(*) FROM still").fetchone() == (2000,)
        finally:
            connection.close()


def test_a_safety_copy_is_built_from_the_archive_and_undoes_the_restore_exactly(
        helper_env, stocked_volume, tmp_path, monkeypatch, capsys):
    archives, work = tmp_path / "archives", tmp_path / "work"
    archive = backup(stocked_volume, archives)
    # The volume as the app left it: one file changed since the archive.
    in_volume(helper_env, stocked_volume, "echo today > /v/small/f0007.txt")
    today = testkit.volume_state(stocked_volume)
    monkeypatch.setenv("BACKUP_DIR", str(work))  # no archive of the volume there
    capsys.readouterr()
    assert restore_docker_volume_main([stocked_volume, archive, "--force"]) == 0
    captured = capsys.readouterr()
    [safety] = re.findall(r"^Safety backup of the current contents: (\S+)$", captured.out, re.M)
    assert os.path.dirname(safety) == str(work)
    copied, written = copied_and_written(captured.err, archive)
    assert copied > 2 * written  # the large file and the unchanged runs came from the archive
    with open(safety, "rb") as file:
        assert gzipstream.member_length(file.read(1 << 16)) is not None  # blocked, recorded
    assert record_of(safety)["blocks"]
    # The copy is what the volume held: restoring it puts today's state back.
    assert restore_docker_volume_main([stocked_volume, safety, "--force", "--quiet"]) == 0
    assert testkit.volume_state(stocked_volume) == today
    # Unchanged since an archive in the work folder, the next safety copy is that archive.
    testkit.next_second()  # the restore's ctimes lie before the backup's listing
    latest = backup(stocked_volume, work)
    testkit.next_second()
    capsys.readouterr()
    assert restore_docker_volume_main([stocked_volume, archive, "--force"]) == 0
    [linked] = re.findall(r"^Safety backup of the current contents: (\S+)$",
                          capsys.readouterr().out, re.M)
    assert linked != latest and os.path.samefile(linked, latest)
    assert names.parse_archive_name(os.path.basename(linked))[0] == stocked_volume


def test_a_volume_unchanged_since_the_archive_is_saved_under_an_archive_name(
        helper_env, stocked_volume, tmp_path, monkeypatch, capsys):
    # The safety copy is then a hard link to the archive being restored. It once got the
    # name <volume>__None.tar.gz, which no command lists, restores or deletes.
    archive = backup(stocked_volume, tmp_path / "archives")
    state = testkit.volume_state(stocked_volume)
    work = tmp_path / "work"
    monkeypatch.setenv("BACKUP_DIR", str(work))  # no archive of the volume there
    testkit.next_second()
    capsys.readouterr()
    assert restore_docker_volume_main([stocked_volume, archive, "--force"]) == 0
    [saved] = re.findall(r"^Safety backup of the current contents: (\S+)$",
                         capsys.readouterr().out, re.M)
    assert os.path.samefile(saved, archive)  # unchanged: a link, not a new archive
    assert os.path.dirname(saved) == str(work)
    assert names.parse_archive_name(os.path.basename(saved))[0] == stocked_volume
    with open(saved + ".sha256") as checksum, open(archive + ".sha256") as original:
        assert checksum.read().split() == [original.read().split()[0],
                                           os.path.basename(saved)]
    assert sorted(os.listdir(str(work))) == [os.path.basename(saved) + suffix
                                             for suffix in ("", ".listing", ".sha256")]
    assert testkit.volume_state(stocked_volume) == state


def test_a_safety_copy_that_is_the_archive_byte_for_byte_is_a_link_to_it(
        helper_env, stocked_volume, make_volume, tmp_path, monkeypatch, capsys):
    """A volume restored from an archive holds it in new files (new inodes and ctimes: no
    listing proves it unchanged), so its safety copy is built from the archive by content;
    when that comes out byte for byte the archive, nothing is written: it is a hard link."""
    in_volume(helper_env, stocked_volume, "rm /v/hard")  # a second name is read every time
    testkit.next_second()
    archive = backup(stocked_volume, tmp_path / "archives")
    target = make_volume()
    assert restore_docker_volume_main([target, archive, "--force", "--quiet"]) == 0
    state = testkit.volume_state(target)
    work = tmp_path / "work"
    monkeypatch.setenv("BACKUP_DIR", str(work))
    testkit.next_second()  # the restore's ctimes lie before the copy's listing
    capsys.readouterr()
    assert restore_docker_volume_main([target, archive, "--force"]) == 0
    captured = capsys.readouterr()
    [saved] = re.findall(r"^Safety backup of the current contents: (\S+)$", captured.out, re.M)
    assert os.path.samefile(saved, archive) and os.path.dirname(saved) == str(work)
    assert "its archive is byte for byte %s, so it is published as a hard link to it" \
        % archive in captured.err
    copied, written = copied_and_written(captured.err, archive)
    assert copied > 0 and written == 0.0
    with open(saved + ".sha256") as checksum, open(archive + ".sha256") as original:
        assert checksum.read().split() == [original.read().split()[0],
                                           os.path.basename(saved)]
    # Its record is the restored volume's listing: unchanged since, the next copy is a
    # link by that listing alone.
    assert record_of(saved)["listing"] != record_of(archive)["listing"]
    assert restore_docker_volume_main([target, saved, "--force", "--quiet"]) == 0
    assert testkit.volume_state(target) == state
    assert verify_backup_main([saved]) == 0


def test_a_restored_volume_is_backed_up_from_the_archive_by_content(
        helper_env, stocked_volume, make_volume, tmp_path, capsys):
    folder = tmp_path / "backups"
    first = backup(stocked_volume, folder)
    # Restored: every entry is new to the listing (inode, ctime), none in content.
    assert restore_docker_volume_main([stocked_volume, first, "--force", "--quiet"]) == 0
    expected = testkit.volume_state(stocked_volume)
    testkit.next_second()
    capsys.readouterr()
    second = backup(stocked_volume, folder)
    copied, written = copied_and_written(capsys.readouterr().err, first)
    assert copied > 0 and written is not None
    # Only what holds a hard link, the runs beside it and the end are written again.
    assert written < 0.05 * copied
    assert record_of(second)["blocks"][0][6][3] is not None  # runs carry their bytes' digest
    assert restored_state(make_volume, second) == expected


def test_a_restored_volume_with_a_file_fewer_compresses_only_the_run_that_held_it(
        helper_env, stocked_volume, make_volume, tmp_path, capsys):
    folder = tmp_path / "backups"
    first = backup(stocked_volume, folder)
    assert restore_docker_volume_main([stocked_volume, first, "--force", "--quiet"]) == 0
    # A file goes from a run followed by another of many files: the later one, and every
    # run after it until the next hard link's, would begin one file later.
    runs = [block for block in record_of(first)["blocks"] if block[0] == "run"]
    with tarfile.open(first) as archive:
        names = [member.name[2:] for member in archive]
    starts = [names.index(bytes.fromhex(run[6][0]).decode()) for run in runs] + [len(names)]
    at = next(index for index in range(len(runs) - 1)
              if runs[index][6][1] > 2 and runs[index + 1][6][1] > 2)
    gone = [name for name in names[starts[at]:starts[at + 1]] if name.startswith("small/f")][-1]
    # Its folder's mtime changes too: the run with the folder's header is read again.
    holder = max(index for index in range(len(runs)) if starts[index] <= names.index("small"))
    bound = sum(runs[index][4] for index in {at, holder}) / 2 ** 20
    in_volume(helper_env, stocked_volume, "rm /v/%s" % gone)
    expected = testkit.volume_state(stocked_volume)
    testkit.next_second()
    capsys.readouterr()
    second = backup(stocked_volume, folder)
    copied, written = copied_and_written(capsys.readouterr().err, first)
    # Those runs and the neighbours of the hard link, as for a restored volume: the runs after
    # the file are cut where the first archive's were and copied.
    assert written is not None and written < bound + 0.05 * copied
    assert restored_state(make_volume, second) == expected


def test_a_name_with_a_line_break_keys_nothing_by_the_listing(helper_env, stocked_volume,
                                                              tmp_path, capsys):
    # A first backup is tarred while it is listed: the record is keyed before the listing
    # turns out to hold a name that could forge a line of another file.
    in_volume(helper_env, stocked_volume, "printf x > \"/v/small/odd\n1 2 1 1 81a4 0 0 1 "
              "big.db\"")
    testkit.next_second()
    first = backup(stocked_volume, tmp_path / "backups")
    blocks = record_of(first)["blocks"]
    assert [block for block in blocks if block[0] == "run"]
    assert all(block[6][2] is None for block in blocks if block[0] == "run")
    assert all(block[6][1] is None for block in blocks if block[0] == "head")
    assert any(name.endswith("small/odd\n1 2 1 1 81a4 0 0 1 big.db")
               for name in testkit.archive_manifest(first))
    # The next backup finds the helper's line for that name, plans nothing from the
    # listing and reads the whole volume again.
    testkit.next_second()
    capsys.readouterr()
    second = backup(stocked_volume, tmp_path / "backups")
    assert "some names hold a line break; reading all of it" in capsys.readouterr().err
    assert testkit.archive_manifest(second) == testkit.archive_manifest(first)


def test_a_first_backup_of_a_volume_written_all_the_time_is_complete_and_restores(
        helper_env, stocked_volume, make_volume, tmp_path, capsys):
    # Files come and go while the helper lists and tars at the same time: members the
    # listing lacks, lines tar never meets. The archive is what tar read; the record only
    # trusts what both saw.
    writer = "aisb-test-writer-%s" % os.urandom(4).hex()
    testkit.docker("run", "-d", "--name", writer, "--network", "none", "-v",
                   stocked_volume + ":/v", helper_env, "sh", "-c",
                   "mkdir -p /v/small/churn; i=0; while true; do i=$((i+1)); "
                   "echo $i > /v/small/churn/f$i; rm -f /v/small/churn/f$((i-5)); done")
    try:
        folder = tmp_path / "backups"
        first = backup(stocked_volume, folder)
        testkit.next_second()
        second = backup(stocked_volume, folder)  # planned from the first one's record
    finally:
        subprocess.run(["docker", "rm", "-f", writer], capture_output=True)
    for archive in (first, second):
        assert verify_backup_main([archive, "--quiet"]) == 0
        restored = make_volume()
        assert restore_docker_volume_main([restored, archive, "--force", "--quiet"]) == 0
        manifest = testkit.archive_manifest(archive)
        assert "./big.db" in manifest and "./small/deeper/f0699.txt" in manifest
    # Every entry the writer leaves alone came through whole.
    state = testkit.volume_state(stocked_volume)
    quiet = {name: value for name, value in state.items() if b"churn" not in name}
    restored_quiet = {name: value for name, value in restored_state(make_volume, second).items()
                      if b"churn" not in name}
    assert restored_quiet == quiet


@pytest.mark.parametrize("held", [True, False])
def test_a_night_is_planned_once_while_the_helper_lists(helper_env, stocked_volume, make_volume,
                                                        tmp_path, monkeypatch, capsys, held):
    """With an archive to copy from, the plan is made from the listing as the helper writes
    it, once: the helper is told it when the listing ends, and the assembly takes the same
    plan, kept (a night's few names) or made again from the listing (past HELD_ENTRIES)."""
    folder = tmp_path / "backups"
    first = backup(stocked_volume, folder)
    in_volume(helper_env, stocked_volume, "echo new > /v/small/new.txt")
    testkit.next_second()
    planned, read_whole = [], []
    real_plan, real_entries = blocked.plan, blocked.entries

    def plan(listed, previous, snapshots):
        planned.append(previous is not None)
        return real_plan(listed, previous, snapshots)

    def entries(*arguments):
        read_whole.append(1)
        return real_entries(*arguments)
    monkeypatch.setattr(blocked, "plan", plan)
    monkeypatch.setattr(blocked, "entries", entries)
    if not held:
        monkeypatch.setattr(blocked, "HELD_ENTRIES", 0)
    capsys.readouterr()
    second = backup(stocked_volume, folder)
    log = capsys.readouterr().err
    # Once from the listing as written; a plan not kept once more from the whole file.
    assert planned == [True] * (1 if held else 2) and len(read_whole) == (0 if held else 1)
    copied, written = copied_and_written(log, first)
    assert copied > 5 and written <= 2 * blocked.RUN_SIZE / (1 << 20) + 0.1, log
    assert restored_state(make_volume, second) == testkit.volume_state(stocked_volume)
