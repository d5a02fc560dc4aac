"""backup_path and restore_path on the host (no engine needed)."""

import gzip
import io
import json
import os
import re
import shutil
import socket
import stat
import subprocess
import sys
import tarfile
import threading

import pytest

import testkit
from ai_stack_backup import cli, files, hostpath, hosttree, pipeline
from ai_stack_backup.config import Config
from ai_stack_backup.errors import BackupError
from ai_stack_backup.hostpath import PathSource
from ai_stack_backup.hosttree import TreeWriter
from ai_stack_backup.report import Reporter
from conftest import SCRIPTS


@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        pytest.skip("owners other than our own need root")


@pytest.fixture
def tricky(tmp_path, root_only):
    """A tricky tree at tmp_path/src/output; gives its path and state."""
    source = tmp_path / "src" / "output"
    source.parent.mkdir()
    testkit.make_tricky_tree(source)
    return str(source), testkit.tree_state(str(source))


def backup(source, folder, capsys=None):
    assert cli.backup_path_main([source, str(folder)]) == 0
    return testkit.only_archive(folder)


def test_round_trip_is_exact(tricky, tmp_path, capsys):
    source, state = tricky
    archive = backup(source, tmp_path / "backups")
    out = capsys.readouterr().out.splitlines()
    assert out == ["Backing up path: %s" % source, "Output: %s" % archive, "OK"]
    name = os.path.basename(archive)
    assert name.startswith(source.lstrip("/").replace("/", "_") + "__")
    assert stat.S_IMODE(os.stat(archive).st_mode) == 0o600
    with tarfile.open(archive) as listing:
        names = listing.getnames()
    assert names[0] == "output" and all(n == "output" or n.startswith("output/") for n in names)
    target = tmp_path / "restored" / "output"
    target.parent.mkdir()
    assert cli.restore_path_main([archive, str(target), "--force"]) == 0
    assert testkit.tree_state(str(target)) == state
    assert os.listdir(str(target.parent)) == ["output"]  # no staging left behind


@pytest.mark.parametrize("tool", ["gnu", "busybox"])
def test_other_tars_extract_it_without_a_warning(tricky, tmp_path, tool):
    source, state = tricky
    archive = backup(source, tmp_path / "backups")
    destination = tmp_path / tool
    destination.mkdir()
    if tool == "gnu":
        command = ["tar", "-xzf", archive, "-C", str(destination)]
    else:
        if not os.path.exists("/bin/busybox"):
            pytest.skip("busybox is not installed")
        command = ["/bin/busybox", "tar", "-xzf", archive, "-C", str(destination)]
    result = subprocess.run(command, capture_output=True)
    assert (result.returncode, result.stdout, result.stderr) == (0, b"", b"")
    restored = testkit.tree_state(str(destination / "output"))
    if tool == "busybox":  # busybox sets no symlink owner or mtime and folder mtimes too early
        keep = lambda s: {p: (e[0], e[1], None if e[0] == "symlink" else e[2],  # noqa: E731
                              None if e[0] == "symlink" else e[3],
                              None if e[0] in ("symlink", "dir") else e[4], e[5], e[6])
                          for p, e in s.items()}
        assert keep(restored) == keep(state)
    else:
        assert restored == state


def test_fifos_are_never_read_and_sockets_and_devices_are_skipped(tmp_path, root_only):
    source = tmp_path / "src"
    source.mkdir()
    os.mkfifo(str(source / "fifo"))  # no writer: reading it would hang for ever
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(source / "sock"))
    os.mknod(str(source / "null"), stat.S_IFCHR | 0o600, os.makedev(1, 3))
    (source / "file").write_text("data")
    result = subprocess.run([sys.executable, os.path.join(SCRIPTS, "backup_path.py"), str(source),
                             str(tmp_path / "b")], capture_output=True, timeout=60)
    listener.close()
    assert result.returncode == 0, result.stderr
    assert b"sock is a socket; skipped" in result.stderr
    assert b"null is a device file; skipped" in result.stderr
    archive = testkit.only_archive(tmp_path / "b")
    with tarfile.open(archive) as listing:
        assert sorted(listing.getnames()) == ["src", "src/fifo", "src/file"]
        assert listing.getmember("src/fifo").isfifo()


def test_archive_inside_the_source_is_not_archived(tmp_path):
    source = tmp_path / "data"
    (source / "backups").mkdir(parents=True)
    (source / "file").write_bytes(os.urandom(50000))
    archive = backup(str(source), source / "backups")
    with tarfile.open(archive) as listing:
        assert sorted(listing.getnames()) == ["data", "data/backups", "data/file"]


def test_symlinked_source_backs_up_its_target(tmp_path, capsys):
    real = tmp_path / "real"
    real.mkdir()
    (real / "f").write_text("x")
    os.symlink(str(real), str(tmp_path / "output"))
    archive = backup(str(tmp_path / "output") + "/", tmp_path / "b")
    assert "is a symlink; backing up what it points to" in capsys.readouterr().err
    with tarfile.open(archive) as listing:
        assert listing.getnames() == ["output", "output/f"] and listing.getmember("output").isdir()


def test_a_single_file_can_be_backed_up(tmp_path):
    (tmp_path / "notes.txt").write_text("note")
    archive = backup(str(tmp_path / "notes.txt"), tmp_path / "b")
    assert os.path.basename(archive).startswith(str(tmp_path).lstrip("/").replace("/", "_")
                                                + "_notes.txt__")
    with tarfile.open(archive) as listing:
        assert listing.getnames() == ["notes.txt"]


@pytest.mark.parametrize("size", [4, 3 * 1024 * 1024])  # a run's member; a large file's
def test_a_symlinked_single_file_backs_up_its_target(tmp_path, capsys, size):
    """As for a folder, a source that is a symlink to a file is followed: the archive holds
    the file's content under the link's name (it held nothing, with a warning that the
    file vanished)."""
    content = os.urandom(size)
    (tmp_path / "real.db").write_bytes(content)
    os.symlink(str(tmp_path / "real.db"), str(tmp_path / "current.db"))
    archive = backup(str(tmp_path / "current.db"), tmp_path / "b")
    assert "vanished" not in capsys.readouterr().err
    with tarfile.open(archive) as listing:
        assert listing.getnames() == ["current.db"]
        assert listing.extractfile("current.db").read() == content


def test_stdout_stream_is_the_file_form(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_bytes(os.urandom(3 * 1024 * 1024))
    archive = backup(str(source), tmp_path / "b")
    streamed = subprocess.run([sys.executable, os.path.join(SCRIPTS, "backup_path.py"),
                               str(source), "-"], capture_output=True, timeout=60)
    assert streamed.returncode == 0
    assert streamed.stderr.decode().splitlines() == ["Backing up path: %s" % source,
                                                     "Output: -", "OK"]
    with open(archive, "rb") as file:
        assert gzip.decompress(streamed.stdout) == gzip.decompress(file.read())


def test_restore_path_from_stdin(tricky, tmp_path, monkeypatch):
    source, state = tricky
    archive = backup(source, tmp_path / "backups")
    target = tmp_path / "elsewhere"
    with open(archive, "rb") as stdin:
        result = subprocess.run([sys.executable, os.path.join(SCRIPTS, "restore_path.py"), "-",
                                 str(target), "--force"], stdin=stdin, capture_output=True,
                                env=dict(os.environ, BACKUP_DIR=str(tmp_path / "spool")),
                                timeout=120)
    assert result.returncode == 0, result.stderr
    assert testkit.tree_state(str(target)) == state
    assert os.listdir(str(tmp_path / "spool")) == []


def test_restore_path_refusals_change_nothing(tricky, tmp_path, capsys):
    source, _ = tricky
    archive = backup(source, tmp_path / "backups")
    target = tmp_path / "target"
    (target / "keep").mkdir(parents=True)
    (target / "keep" / "me").write_text("precious")
    before = testkit.tree_state(str(target))

    capsys.readouterr()
    assert cli.restore_path_main([archive, str(target)]) == 1
    assert capsys.readouterr().err.startswith("ERROR: restore requires --force\n")

    damaged = tmp_path / "damaged.tar.gz"
    data = bytearray(open(archive, "rb").read())
    data[len(data) // 3] ^= 0xFF
    damaged.write_bytes(bytes(data))
    assert cli.restore_path_main([str(damaged), str(target), "--force"]) == 1
    assert re.search(r"is refused \[(gzip-crc|gzip-corrupt)\]", capsys.readouterr().err)

    volume_like = tmp_path / "volume.tar.gz"
    with tarfile.open(str(volume_like), "w:gz") as archive_file:
        for name in ("./", "./a", "./b"):
            info = tarfile.TarInfo(name)
            info.type = tarfile.DIRTYPE
            archive_file.addfile(info)
    assert cli.restore_path_main([str(volume_like), str(target), "--force"]) == 1
    error = capsys.readouterr().err
    assert "is refused [volume-archive]" in error and "restore_docker_volume" in error
    # Shapes that are not one path's archive, refused although every member is sound.
    for name, members, rule in [
            ("two-tops.tar.gz", ["a/", "b/"], "several-top-level-entries"),
            ("no-members.tar.gz", [], "no-members")]:
        with tarfile.open(str(tmp_path / name), "w:gz") as archive_file:
            for member in members:
                info = tarfile.TarInfo(member)
                info.type = tarfile.DIRTYPE
                archive_file.addfile(info)
        assert cli.restore_path_main([str(tmp_path / name), str(target), "--force"]) == 1
        assert "is refused [%s]" % rule in capsys.readouterr().err
    assert testkit.tree_state(str(target)) == before
    assert sorted(os.listdir(str(tmp_path))) == sorted(["backups", "damaged.tar.gz", "src",
                                                        "target", "volume.tar.gz",
                                                        "two-tops.tar.gz", "no-members.tar.gz"])


def test_restore_path_decompresses_the_archive_once(tricky, tmp_path, monkeypatch):
    from ai_stack_backup import archive as archive_module
    source, expected = tricky
    archive = backup(source, tmp_path / "backups")
    passes = []
    original = archive_module.iter_gunzip

    def counted(read):
        passes.append(read)
        return original(read)
    monkeypatch.setattr(archive_module, "iter_gunzip", counted)
    target = tmp_path / "target"
    assert cli.restore_path_main([archive, str(target), "--force"]) == 0
    assert len(passes) == 1
    assert testkit.tree_state(str(target)) == expected


def test_failure_while_extracting_leaves_the_target(tricky, tmp_path, monkeypatch, capsys):
    source, _ = tricky
    archive = backup(source, tmp_path / "backups")
    target = tmp_path / "target"
    target.mkdir()
    (target / "old").write_text("old contents")
    before = testkit.tree_state(str(target))

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(hostpath.os, "link", disk_full)
    assert cli.restore_path_main([archive, str(target), "--force"]) == 1
    error = capsys.readouterr().err
    assert "the disk is full" in error and "was not changed" in error
    assert testkit.tree_state(str(target)) == before
    assert sorted(os.listdir(str(tmp_path))) == ["backups", "src", "target"]  # no staging


def test_unreadable_file_fails_the_backup_and_publishes_nothing(tmp_path, monkeypatch, capsys):
    source = tmp_path / "src"
    source.mkdir()
    (source / "secret").write_text("x")
    original_open = os.open

    def denied(path, flags, *args, **kwargs):
        if os.fsdecode(path).endswith("secret"):
            raise PermissionError(13, "Permission denied")
        return original_open(path, flags, *args, **kwargs)
    monkeypatch.setattr(hostpath.os, "open", denied)
    assert cli.backup_path_main([str(source), str(tmp_path / "b")]) == 1
    assert "cannot read %s: Permission denied" % (source / "secret") in capsys.readouterr().err
    assert os.listdir(str(tmp_path / "b")) == []


def test_disk_full_while_writing_leaves_nothing(tmp_path, monkeypatch, capsys):
    source = tmp_path / "src"
    source.mkdir()
    (source / "f").write_bytes(os.urandom(4 * 1024 * 1024))
    (tmp_path / "b").mkdir()
    earlier = tmp_path / "b" / "earlier__20260101T000000Z.tar.gz"
    earlier.write_bytes(b"an earlier archive")
    from ai_stack_backup import files
    original = files.AtomicArchive.__init__

    def small_disk(self, final_path):
        original(self, final_path)
        real_write = self.output.file.write

        class FullFile:
            def __init__(self, file):
                self._file, self.written = file, 0

            def write(self, data):
                self.written += len(data)
                if self.written > 1024 * 1024:
                    raise OSError(28, "No space left on device")
                return real_write(data)

            def __getattr__(self, name):
                return getattr(self._file, name)
        self.output.file = FullFile(self.output.file)  # what the archive is written through
    monkeypatch.setattr(files.AtomicArchive, "__init__", small_disk)
    assert cli.backup_path_main([str(source), str(tmp_path / "b")]) == 1
    assert "the disk is full" in capsys.readouterr().err
    assert os.listdir(str(tmp_path / "b")) == [earlier.name]
    assert earlier.read_bytes() == b"an earlier archive"


def test_copying_scripts_alone_is_an_install(tmp_path):
    install = tmp_path / "host" / "scripts"
    shutil.copytree(SCRIPTS, str(install), ignore=shutil.ignore_patterns("__pycache__"))
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "f").write_text("x")
    result = subprocess.run(["sh", str(install / "backup_path.sh"), str(tmp_path / "data"),
                             str(tmp_path / "b")], cwd="/", capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[-1] == "OK"


def test_internal_names_never_meet_archived_ones(tmp_path):
    """A top-level entry or a folder named like the tool's own staging names restores too."""
    for top in (".previous", "previous", "tree"):
        source = tmp_path / ("src-" + top) / top
        (source / ".previous" / "tree").mkdir(parents=True)
        (source / ".previous" / "tree" / "f").write_text(top)
        state = testkit.tree_state(str(source))
        archive = backup(str(source), tmp_path / ("b-" + top))
        target = tmp_path / ("t-" + top) / top
        target.mkdir(parents=True)
        (target / "old").write_text("old")
        assert cli.restore_path_main([archive, str(target), "--force", "--quiet"]) == 0
        assert testkit.tree_state(str(target)) == state


def test_a_backup_folder_inside_target_is_never_swapped_away(tricky, tmp_path, monkeypatch,
                                                             capsys):
    source, _ = tricky
    archive = backup(source, tmp_path / "outside")
    target = tmp_path / "target"
    (target / "backups").mkdir(parents=True)
    kept = target / "backups" / "owui-data__20260101T000000Z.tar.gz"
    kept.write_bytes(b"an archive the operator keeps here")
    monkeypatch.setenv("BACKUP_DIR", str(target / "backups"))
    before = testkit.tree_state(str(target))
    capsys.readouterr()
    assert cli.restore_path_main([archive, str(target), "--force"]) == 1
    error = capsys.readouterr().err
    assert "the backup folder %s lies inside %s" % (target / "backups", target) in error
    assert testkit.tree_state(str(target)) == before
    # Nor when the archive itself lies inside TARGET.
    inside = target / "backups" / os.path.basename(archive)
    shutil.copyfile(archive, str(inside))
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path / "elsewhere"))
    assert cli.restore_path_main([str(inside), str(target), "--force"]) == 1
    assert "the archive %s lies inside %s" % (inside, target) in capsys.readouterr().err
    assert kept.read_bytes() == b"an archive the operator keeps here"


def test_restore_path_keeps_the_previous_contents_as_an_archive(tricky, tmp_path, own_backup_dir,
                                                                capsys):
    source, state = tricky
    archive = backup(source, tmp_path / "backups")
    target = tmp_path / "target"
    (target / "sub").mkdir(parents=True)
    (target / "sub" / "precious").write_text("the only copy")
    previous = testkit.tree_state(str(target))
    capsys.readouterr()
    assert cli.restore_path_main([archive, str(target), "--force"]) == 0
    out = capsys.readouterr().out.splitlines()
    saved = [name for name in os.listdir(str(own_backup_dir)) if name.endswith(".tar.gz")]
    assert len(saved) == 1
    saved = os.path.join(str(own_backup_dir), saved[0])
    assert out[2] == "Safety backup of the current contents: %s" % saved
    assert out[-2:] == ["OK", "Previous contents kept in: %s" % saved]
    assert testkit.tree_state(str(target)) == state
    assert cli.restore_path_main([saved, str(target), "--force", "--no-safety-backup"]) == 0
    assert testkit.tree_state(str(target)) == previous
    assert len(testkit.archives_in(own_backup_dir)) == 1  # declined: no second copy


def test_a_swapped_staging_folder_redirects_nothing(tricky, tmp_path, monkeypatch):
    """Another user who can write TARGET's parent swaps the staging folder for a symlink
    into a folder of theirs, whose ``tree`` points at a folder they must not touch."""
    source, state = tricky
    archive = backup(source, tmp_path / "backups")
    parent = tmp_path / "shared"
    parent.mkdir()
    os.chmod(str(parent), 0o777)
    target = parent / "output"
    target.mkdir()
    victim = tmp_path / "victim"
    victim.mkdir(mode=0o700)
    evil = tmp_path / "evil"
    evil.mkdir()
    os.symlink(str(victim), str(evil / "tree"))
    swapped, extracting = threading.Event(), threading.Event()

    def thief():
        # Once the restore holds the staging folder open and extracts: a swap before that
        # (between its mkdir and its open) is refused outright, which is not this case.
        extracting.wait(10)
        while not swapped.is_set():
            for name in os.listdir(str(parent)):
                if name.startswith(files.WORK_PREFIX + "restore-"):
                    os.rename(str(parent / name), str(parent / "moved-away"))
                    os.symlink(str(evil), str(parent / name))
                    swapped.set()
                    return
    original_create = hostpath._HostExtractor.create

    def create_after_the_swap(self, member, data):
        extracting.set()
        assert swapped.wait(10), "the thief never saw the staging folder"
        return original_create(self, member, data)
    monkeypatch.setattr(hostpath._HostExtractor, "create", create_after_the_swap)
    thread = threading.Thread(target=thief, daemon=True)
    thread.start()
    assert cli.restore_path_main([archive, str(target), "--force", "--quiet"]) == 0
    thread.join(10)
    assert os.listdir(str(victim)) == [] and os.stat(str(victim)).st_uid == os.geteuid()
    assert os.listdir(str(evil)) == ["tree"]
    assert not os.path.islink(str(target))
    assert testkit.tree_state(str(target)) == state


def test_sparse_files_come_back_sparse(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    with open(str(source / "disk.img"), "wb") as file:
        file.truncate(100 * 1024 * 1024)
        file.seek(50 * 1024 * 1024)
        file.write(os.urandom(1024 * 1024))
    archive = backup(str(source), tmp_path / "b")
    target = tmp_path / "restored"
    assert cli.restore_path_main([archive, str(target), "--force", "--quiet"]) == 0
    restored = os.stat(str(target / "disk.img"))
    assert restored.st_size == 100 * 1024 * 1024
    assert restored.st_blocks * 512 < 10 * 1024 * 1024  # not inflated to 100 MiB
    assert testkit.tree_state(str(target)) == testkit.tree_state(str(source))


def test_a_path_backup_copies_what_did_not_change_from_the_previous_archive(tmp_path, capsys):
    """OUTPUT_ROOT grows by new transcripts each day: the next archive copies the rest from
    the previous one (listed by the tool itself) and is still complete and exact."""
    source = str(tmp_path / "src" / "output")
    os.makedirs(os.path.join(source, "sub"))
    os.symlink("day1-000.txt", os.path.join(source, "sub", "link"))
    testkit._write(os.path.join(source, "sub", "big.bin"), os.urandom(3 << 20))
    for index in range(900):  # four run members of transcripts
        testkit._write(os.path.join(source, "day1-%03d.txt" % index),
                       b"transcript %d " % index * 400)
    testkit.next_second()
    folder = tmp_path / "backups"
    assert cli.backup_path_main([source, str(folder), "--quiet"]) == 0
    first = testkit.archives_in(folder)[-1]
    testkit._write(os.path.join(source, "day2-new.txt"), b"a new transcript\n" * 100)
    testkit.next_second()
    capsys.readouterr()
    assert cli.backup_path_main([source, str(folder), "--quiet"]) == 0
    second = testkit.archives_in(folder)[-1]
    log = capsys.readouterr().err
    found = re.search(r"path %s: ([0-9.]+) MiB copied from %s, ([0-9.]+) MiB read"
                      % (re.escape(source), re.escape(first)), log)
    # Read again: the run with the root folder's line, and the one the new name joined; the
    # other two runs and the 3 MiB file were copied.
    copied, written = float(found.group(1)), float(found.group(2))
    assert copied >= 4.5 and written <= 2.5, log
    with tarfile.open(first) as old, tarfile.open(second) as new:
        before = {member.name: (member.mode, member.mtime, member.size) for member in old}
        after = {member.name: (member.mode, member.mtime, member.size) for member in new}
    assert {name for name in set(before) | set(after)
            if before.get(name) != after.get(name)} == {"output", "output/day2-new.txt"}
    target = tmp_path / "restored" / "output"
    target.parent.mkdir()
    assert cli.restore_path_main([second, str(target), "--force"]) == 0
    assert testkit.tree_state(str(target)) == testkit.tree_state(source)
    # Listed in the walk that wrote it, the record holds the listing a walk of its own takes:
    # skip-if-unchanged (which lists first) finds the tree unchanged.
    testkit.next_second()  # a new archive name
    linked = pipeline.backup(PathSource(source), str(folder), Config(threads=1),
                             Reporter(io.StringIO(), io.StringIO()), skip_unchanged=True)
    assert linked.linked_to == second


def test_path_entries_the_walk_cannot_vouch_for_are_read_again(tmp_path, monkeypatch, capsys):
    """A file changed in the second the listing began, and a file with a second name, are
    never keyed by their lines, and such a listing proves no tree unchanged: the next backup
    reads them again and copies the rest; once listed after the change, the tree links."""
    source = str(tmp_path / "src" / "output")
    os.makedirs(source)
    for index in range(900):  # four run members of transcripts
        testkit._write(os.path.join(source, "day1-%03d.txt" % index),
                       b"transcript %d " % index * 400)
    os.link(os.path.join(source, "day1-100.txt"), os.path.join(source, "second-name.txt"))
    testkit.next_second()
    racy = os.path.join(source, "day1-500.txt")
    os.chmod(racy, 0o640)  # its ctime: the second the listing begins in, below

    class ListedInTheSecondOfTheChange(hostpath._Lines):
        def __init__(self):
            super().__init__()
            self.started = os.stat(racy).st_ctime_ns // 1000000000

    folder = tmp_path / "backups"
    # Only for this backup: undo() would also take back the test's own HOME and BACKUP_DIR.
    with monkeypatch.context() as patched:
        patched.setattr(hostpath, "_Lines", ListedInTheSecondOfTheChange)
        assert cli.backup_path_main([source, str(folder), "--quiet"]) == 0
    first = testkit.archives_in(folder)[-1]
    with open(first + ".listing") as file:
        saved = json.load(file)
    assert saved["listing"] is None  # a listing taken while an entry changed proves nothing
    runs = [block[6] for block in saved["blocks"] if block[0] == "run"]
    assert sorted((bytes.fromhex(key[0]).decode(), key[1]) for key in runs
                  if key[2] is None) == [("output/day1-100.txt", 1), ("output/day1-500.txt", 1),
                                         ("output/second-name.txt", 1)]
    testkit.next_second()
    capsys.readouterr()
    assert cli.backup_path_main([source, str(folder), "--quiet"]) == 0
    second = testkit.archives_in(folder)[-1]
    found = re.search(r"([0-9.]+) MiB copied from %s, ([0-9.]+) MiB read"
                      % re.escape(first), capsys.readouterr().err)
    # Those three files (5 KiB each) are read again; everything else is copied.
    assert found and float(found.group(1)) >= 3.0 and float(found.group(2)) <= 0.05
    target = tmp_path / "restored" / "output"
    target.parent.mkdir()
    assert cli.restore_path_main([second, str(target), "--force"]) == 0
    assert testkit.tree_state(str(target)) == testkit.tree_state(source)
    # Listed after the change, the tree is proven unchanged: skip-if-unchanged links to it.
    testkit.next_second()
    linked = pipeline.backup(PathSource(source), str(folder), Config(threads=1),
                             Reporter(io.StringIO(), io.StringIO()), skip_unchanged=True)
    assert linked.linked_to == second


class _Warnings:
    def __init__(self):
        self.said = []

    def warn(self, text):
        self.said.append(text)


def _member_of(tar_bytes):
    """Give the (TarInfo, data) of the one member in ``tar_bytes``, read by tarfile."""
    with tarfile.open(fileobj=io.BytesIO(tar_bytes + bytes(1024)), mode="r:") as archive:
        info = archive.next()
        return info, archive.extractfile(info).read() if info.isfile() else None


@pytest.mark.parametrize("size", [10, 3 * 1024 * 1024])  # read whole; streamed by add()
def test_a_file_that_shrinks_while_it_is_read_is_filled_with_zeros_and_said(tmp_path, size):
    """tar's rule: the header's size holds, the missing bytes are zeros, a warning says so;
    the member stays readable."""
    path = tmp_path / "shrinking"
    path.write_bytes(b"x" * size)

    class Shrinking(TreeWriter):
        def open_file(self, name):
            found = super().open_file(name)
            os.truncate(name, 3)  # after the fstat that gave the header its size
            return found

    said = _Warnings()
    output = io.BytesIO()
    tree = Shrinking(output, said)
    assert tree.add(os.fsencode(path), b"shrinking", os.lstat(str(path))) is False
    tree.flush()
    assert len(output.getvalue()) == 512 + size + -size % 512  # the next member's place
    info, data = _member_of(output.getvalue())
    assert (info.name, info.size, data) == ("shrinking", size, b"xxx" + bytes(size - 3))
    assert said.said == ["%s shrank by %d bytes while it was read; the rest is zeros"
                         % (path, size - 3)]
    assert tree.members == 1 and tree.data_bytes == size


def test_an_entry_gone_or_replaced_after_its_lstat_is_skipped_and_said(tmp_path):
    """Between the walk's lstat and the read a file can vanish, or its name be taken by a
    FIFO or a symlink: nothing of it is archived, nothing is followed or read, a warning
    says which."""
    said = _Warnings()
    tree = TreeWriter(None, said)
    statuses = {}
    for name in ("gone", "now-a-fifo", "now-a-symlink"):
        (tmp_path / name).write_bytes(b"data")
        statuses[name] = os.lstat(str(tmp_path / name))
        os.unlink(str(tmp_path / name))
    os.mkfifo(str(tmp_path / "now-a-fifo"))
    (tmp_path / "elsewhere").write_bytes(b"not to be read")
    os.symlink(str(tmp_path / "elsewhere"), str(tmp_path / "now-a-symlink"))
    for name, status in statuses.items():
        assert tree.member(os.fsencode(tmp_path / name), name.encode(), status) == b""
    assert said.said == [
        "%s vanished while it was backed up; skipped" % (tmp_path / "gone"),
        "%s changed type while it was backed up; skipped" % (tmp_path / "now-a-fifo"),
        "%s vanished while it was backed up; skipped" % (tmp_path / "now-a-symlink")]
    assert tree.members == 0


class _Reads(TreeWriter):
    """A TreeWriter that records how much each read asked for."""

    def __init__(self, *arguments):
        super().__init__(*arguments)
        self.asked = []

    def _read(self, descriptor, path, size):
        self.asked.append(size)
        return super()._read(descriptor, path, size)


def test_a_small_file_grown_large_after_its_lstat_is_streamed_not_held(tmp_path):
    """The walk saw a small file; a large one took its name before it was opened (say, a
    rename over it). Its member is the large file's, read READ_SIZE at most at a time, both
    by the streaming writer and by a path backup's walk (which makes it a large file's
    members)."""
    path = tmp_path / "replaced"
    path.write_bytes(b"small")
    seen = os.lstat(str(path))
    grown = os.urandom(3 * hosttree.READ_SIZE + 5)
    path.write_bytes(grown)
    output = io.BytesIO()
    tree = _Reads(output, _Warnings())
    assert tree.add(os.fsencode(path), b"replaced", seen) is False
    tree.flush()
    info, data = _member_of(output.getvalue())
    assert (info.size, data) == (len(grown), grown)
    assert tree.asked and max(tree.asked) <= hosttree.READ_SIZE

    made = []

    class Made:
        def small(self, entry, member, data, trusted):
            made.append(("small", len(member)))

        def large(self, entry, header, size, chunks, trusted):
            made.append(("large", size, b"".join(chunks)))

        def gone(self):
            made.append(("gone",))
    walker = _Reads(None, _Warnings())
    line = hosttree.listing_line(b"replaced", seen)
    entry = hostpath._TreeEntry(line[:-1], b"replaced", os.fsencode(path), seen)
    PathSource._add(entry, walker, Made(), seen.st_ctime + 10)
    assert made == [("large", len(grown), grown)]
    assert max(walker.asked) <= hosttree.READ_SIZE


def test_a_second_name_never_links_to_a_first_that_was_not_archived(tmp_path):
    """A file with two names whose first name is moved away between the walk's lstat and
    its open: the second name is archived with the data, not as a hard link to a name the
    archive does not hold (a restore would refuse such a link)."""
    (tmp_path / "a").write_bytes(b"shared data")
    os.link(str(tmp_path / "a"), str(tmp_path / "b"))
    first = os.lstat(str(tmp_path / "a"))
    (tmp_path / "elsewhere").mkdir()
    os.rename(str(tmp_path / "a"), str(tmp_path / "elsewhere" / "a"))  # still two names
    said = _Warnings()
    output = io.BytesIO()
    tree = TreeWriter(output, said)
    tree.add(os.fsencode(tmp_path / "a"), b"a", first)
    tree.add(os.fsencode(tmp_path / "b"), b"b", os.lstat(str(tmp_path / "b")))
    tree.flush()
    info, data = _member_of(output.getvalue())
    assert (info.name, info.isfile(), data) == ("b", True, b"shared data")
    assert said.said == ["%s vanished while it was backed up; skipped" % (tmp_path / "a")]
    # Archived under its first name, it is that name a later one links to.
    again = TreeWriter(io.BytesIO(), said)
    again.add(os.fsencode(tmp_path / "b"), b"b", os.lstat(str(tmp_path / "b")))
    assert again.member(os.fsencode(tmp_path / "elsewhere" / "a"), b"elsewhere/a",
                        os.lstat(str(tmp_path / "elsewhere" / "a")))[156:157] == b"1"


def _swap_for_symlink(folder, target):
    os.rename(str(folder), str(folder) + "-moved")
    os.symlink(str(target), str(folder))


def _swap_for_folder(folder, other):
    os.rename(str(folder), str(folder) + "-moved")
    os.rename(str(other), str(folder))


@pytest.mark.parametrize("swap", [_swap_for_symlink, _swap_for_folder])
def test_a_folder_swapped_during_the_walk_leads_nowhere_else(tmp_path, swap):
    """The walk saw a folder; before it was listed, a symlink to a folder outside the tree,
    or another folder moved in, took its name. Nothing of the other is listed, the folder's
    contents are skipped with a warning, and the walk goes on with the rest."""
    top = tmp_path / "output"
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "kept.txt").write_text("inside")
    (top / "z-after.txt").write_text("after")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("not the tree's")
    said = _Warnings()
    seen = []
    for _path, arcname, _status in hosttree.walk(str(top), "output", said.warn):
        seen.append(arcname)
        if arcname == b"output/sub":
            swap(top / "sub", outside)
    assert seen == [b"output", b"output/sub", b"output/z-after.txt"]
    assert said.said == ["%s vanished or changed while it was backed up; its contents are "
                         "skipped" % (top / "sub")]


def test_a_file_below_a_folder_swapped_for_a_symlink_is_never_read_from_elsewhere(tmp_path):
    """The walk listed a folder; before one of its files was read, a symlink to a folder
    outside the tree took the folder's name. The file is reached by descriptor from the
    tree's top, so the symlink is not followed: the file is skipped with a warning, and
    nothing from outside is archived."""
    top = tmp_path / "output"
    (top / "sub").mkdir(parents=True)
    (top / "sub" / "file").write_text("inside")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "file").write_text("not the tree's")
    status = os.lstat(str(top / "sub" / "file"))
    _swap_for_symlink(top / "sub", outside)
    said = _Warnings()
    tree = TreeWriter(None, said, top=str(top))
    try:
        assert tree.member(os.fsencode(top / "sub" / "file"), b"output/sub/file", status) == b""
    finally:
        tree.close()
    assert said.said == ["%s vanished while it was backed up; skipped" % (top / "sub" / "file")]


def test_a_folder_that_cannot_be_listed_fails_the_walk_and_leaves_nothing_open(tmp_path,
                                                                               monkeypatch):
    (tmp_path / "top" / "a" / "b").mkdir(parents=True)
    real_listdir = os.listdir

    def refusing(target):
        if isinstance(target, int) and os.readlink("/proc/self/fd/%d" % target).endswith("/b"):
            raise PermissionError(13, "Permission denied")
        return real_listdir(target)
    open_before = len(real_listdir("/proc/self/fd"))
    with monkeypatch.context() as patched, pytest.raises(BackupError) as raised:
        patched.setattr(hosttree.os, "listdir", refusing)
        list(hosttree.walk(str(tmp_path / "top"), "top", _Warnings().warn))
    assert str(raised.value) == "cannot list folder %s: Permission denied" % (
        tmp_path / "top" / "a" / "b")
    assert len(real_listdir("/proc/self/fd")) == open_before
