"""Hostile archives, faults mid-flight, safety backup and rollback, volumes in use (real engine)."""

import contextlib
import gzip
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tarfile

import pytest

import testkit
from ai_stack_backup import cli, files, pipeline, transfer
from ai_stack_backup.names import archive_name
from conftest import SCRIPTS
from test_tarstream import HOSTILE, HOSTILE_RULES, entry, raw_tar

pytestmark = pytest.mark.engine

# busybox extracts nothing until the stream starts; this one sleeps after the wipe.
SLOW_EXTRACT = b'case "$1" in -x*) sleep 600;; esac; busybox tar "$@"'


@pytest.fixture
def small_volume(make_volume, tmp_path):
    """A volume with a few files; gives (name, state)."""
    volume = make_volume()
    data = tmp_path / "small"
    (data / ".hidden").mkdir(parents=True)
    (data / ".hidden" / "token").write_text("secret")
    (data / "app.db").write_bytes(os.urandom(20000))
    testkit.fill_volume(volume, data)
    return volume, testkit.volume_state(volume)


@pytest.fixture
def big_volume(make_volume, tmp_path):
    """A volume with 200 MB of incompressible data: slow enough to interrupt."""
    volume = make_volume()
    data = tmp_path / "big"
    data.mkdir()
    for index in range(8):
        (data / ("blob%d" % index)).write_bytes(os.urandom(25 * 1024 * 1024))
    testkit.fill_volume(volume, data)
    return volume


@contextlib.contextmanager
def own_tmpfs(public_tmp, name, options):
    """A tmpfs mounted with ``options`` in a folder the engine can see; gives its path."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    path = os.path.join(public_tmp, name)
    os.mkdir(path)
    subprocess.run(["mount", "-t", "tmpfs", "-o", options + ",mode=0700", "tmpfs", path],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=True)


@pytest.fixture
def small_disk(public_tmp):
    """A 3 MiB tmpfs the engine can see; gives its path."""
    with own_tmpfs(public_tmp, "small-disk", "size=3m") as path:
        yield path


def volume_on(folder, make_volume, tmp_path):
    """A volume kept in ``folder`` (a bind), holding one precious file; gives its name.

    Its engine Mountpoint shows the data only while a container mounts it: read its tree
    with ``bound_state(folder)``."""
    data = os.path.join(folder, "volume-data")
    os.mkdir(data)
    volume = make_volume(create=False)
    testkit.docker("volume", "create", "--driver", "local", "--opt", "type=none",
                   "--opt", "o=bind", "--opt", "device=" + data, volume)
    (tmp_path / "small").mkdir()
    (tmp_path / "small" / "precious").write_bytes(os.urandom(100000))
    testkit.fill_volume(volume, tmp_path / "small")
    return volume


def bound_state(folder):
    """The tree of the volume ``volume_on`` keeps in ``folder``."""
    state = testkit.tree_state(os.path.join(folder, "volume-data"))
    assert b"precious" in state or len(state) > 1, state  # the folder the volume has
    return state


def without_locks(names):
    """The names of a folder but the lock files (they stay: only the flock on them counts)."""
    return [name for name in names if not name.startswith(files.LOCK_NAME)]


def gz(data):
    return gzip.compress(data)


def write(path, data):
    with open(str(path), "wb") as file:
        file.write(data)
    return str(path)


wait_for = testkit.wait_for


def temp_files(folder):
    return [name for name in os.listdir(str(folder)) if name.startswith(files.WORK_PREFIX)]


# --- hostile and broken archives ------------------------------------------------

BROKEN = {
    "empty file": b"",
    "not gzip": b"PK\x03\x04" + os.urandom(2000),
    "gzip of something that is not tar": gz(b"hello world\n" * 1000),
    "trailing garbage": gz(raw_tar([entry("./f", data=b"1")])) + b"garbage",
    "no end-of-archive marker": gz(raw_tar([entry("./f", data=b"1")], end=b"")),
}
BROKEN_RULES = {"empty file": "empty", "not gzip": "not-gzip",
                "gzip of something that is not tar": "not-tar",
                "trailing garbage": "trailing-data", "no end-of-archive marker": "truncated"}


@pytest.mark.parametrize("case", sorted(HOSTILE) + sorted(BROKEN))
def test_hostile_or_broken_archive_changes_nothing(helper_env, small_volume, tmp_path, case,
                                                   own_backup_dir, capsys):
    volume, original = small_volume
    if case in BROKEN:
        data = BROKEN[case]
    else:  # harmless members first: they must not reach the volume either
        harmless = [entry("./", tarfile.DIRTYPE), entry("./harmless-first", data=b"x")]
        fmt = tarfile.PAX_FORMAT if "pax" in case else tarfile.GNU_FORMAT
        data = gz(raw_tar(harmless + HOSTILE[case], fmt))
    folder = tmp_path / "in"
    folder.mkdir()
    archive = write(folder / "hostile.tar.gz", data)
    assert cli.restore_docker_volume_main([volume, archive, "--force"]) == 1
    rule = BROKEN_RULES[case] if case in BROKEN else HOSTILE_RULES[case]
    assert "is refused [%s]" % rule in capsys.readouterr().err
    assert testkit.volume_state(volume) == original
    assert os.listdir(str(folder)) == ["hostile.tar.gz"]
    # Refused before anything changed: not even a safety copy in the work folder, where one
    # would go.
    assert testkit.archives_in(own_backup_dir) == []


def empty_volume_with_odd_root(make_volume):
    """An empty volume whose root folder has another owner, mode and mtime than a new one's:
    a rollback that only empties it would show."""
    volume = make_volume()
    root = testkit.mountpoint(volume)
    os.chown(root, 1234, 5678)
    os.chmod(root, 0o750)
    os.utime(root, (1_500_000_000, 1_500_000_000))
    return volume


@pytest.mark.parametrize("case", ["dot-dot", "absolute name", "character device",
                                  "through a symlink", "flipped byte", "truncated"])
def test_one_pass_into_a_volume_with_nothing_to_lose_refuses_and_leaves_it(
        helper_env, make_volume, tmp_path, case, capsys):
    """An empty or missing volume is filled as the archive streams; a refusal anywhere in the
    stream (the hostile member comes after harmless ones, damage shows only at the end)
    leaves it exactly as it was: empty with its root folder's owner, mode and mtime, or
    not there at all."""
    harmless = [entry("./", tarfile.DIRTYPE)] + [
        entry("./harmless-%03d" % index, data=os.urandom(20000)) for index in range(50)]
    if case in HOSTILE:
        data = gz(raw_tar(harmless + HOSTILE[case], tarfile.GNU_FORMAT))
        rule = HOSTILE_RULES[case]
    else:
        data = bytearray(gz(raw_tar(harmless, tarfile.GNU_FORMAT)))
        if case == "flipped byte":
            data[len(data) // 2] ^= 0x40
            rule = "(gzip-crc|gzip-corrupt|bad-checksum)"
        else:
            data = data[:len(data) * 2 // 3]
            rule = "truncated"
    archive = write(tmp_path / "case.tar.gz", bytes(data))
    empty = empty_volume_with_odd_root(make_volume)
    before = testkit.volume_state(empty)
    assert cli.restore_docker_volume_main([empty, archive, "--force"]) == 1
    error = capsys.readouterr().err
    assert re.search(r"is refused \[%s\]" % rule, error), error
    assert testkit.volume_state(empty) == before
    missing = make_volume(create=False)
    assert cli.restore_docker_volume_main([missing, archive, "--force"]) == 1
    assert re.search(r"is refused \[%s\]" % rule, capsys.readouterr().err)
    assert not testkit.volume_exists(missing)


def test_helper_extracts_exactly_what_was_checked(helper_env, make_volume, tmp_path):
    """pax records rename and resize members; busybox must see our reading, not its own."""
    members = [entry("./", tarfile.DIRTYPE, mode=0o755),
               entry("./plain-name", data=b"renamed by pax",
                     pax={"path": "./pax-path-" + "p" * 120, "mtime": "1500000000.5",
                          "uid": "3000000", "gid": "3000001"}),
               entry("./link", tarfile.SYMTYPE, linkname="x", pax={"linkpath": "/pax/target"}),
               entry("./global-comment", data=b"ok", pax={"comment": "ignored", "atime": "1"})]
    archive = write(tmp_path / "pax.tar.gz", gz(raw_tar(members, tarfile.PAX_FORMAT)))
    volume = make_volume(create=False)
    assert cli.restore_docker_volume_main([volume, archive, "--force"]) == 0
    state = testkit.volume_state(volume)
    renamed = state[b"pax-path-" + b"p" * 120]
    assert renamed[2:5] == (3_000_000, 3_000_001, 1_500_000_000)
    assert state[b"link"][5] == b"/pax/target"
    assert sorted(state) == sorted([b".", b"pax-path-" + b"p" * 120, b"link", b"global-comment"])


# --- faults while running -----------------------------------------------------------

def start_backup(volume, folder, **environment):
    return subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, "backup_docker_volume.py"), volume, str(folder)],
        env=dict(os.environ, BACKUP_THREADS="1", BACKUP_GZIP_LEVEL="9", **environment),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def growing_temp_file(folder):
    def check():
        names = temp_files(folder) if os.path.isdir(str(folder)) else []
        return any(os.path.getsize(os.path.join(str(folder), name)) > 1024 * 1024
                   for name in names if name.endswith(files.TEMP_SUFFIX))
    return check


def test_sigkill_leaves_no_archive_and_no_helper(helper_env, big_volume, tmp_path):
    folder = tmp_path / "backups"
    process = start_backup(big_volume, folder)
    wait_for(growing_temp_file(folder), "the backup to be under way")
    process.kill()
    process.wait()
    wait_for(lambda: not testkit.helper_containers(big_volume), "the helper to go")
    assert not any(name.endswith(".tar.gz") for name in os.listdir(str(folder)))
    # The next backup_all removes what the killed run left.
    removed = files.remove_stale_work_files(str(folder))
    assert removed and os.listdir(str(folder)) == []


def test_helper_killed_mid_stream_publishes_nothing(helper_env, big_volume, tmp_path):
    folder = tmp_path / "backups"
    process = start_backup(big_volume, folder)
    wait_for(growing_temp_file(folder), "the backup to be under way")
    for name in testkit.helper_containers(big_volume):
        testkit.docker("kill", name, check=False)
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1
    assert b"backing up volume %s failed" % big_volume.encode() in err
    assert b"OK" not in out.splitlines()
    assert os.listdir(str(folder)) == []


def test_disk_full_is_said_plainly_and_leaves_earlier_archives(helper_env, big_volume,
                                                              small_disk, capsys):
    earlier = os.path.join(small_disk, archive_name(big_volume, "20260101T000000Z"))
    write(earlier, b"an earlier archive")
    assert cli.backup_docker_volume_main([big_volume, small_disk, "--quiet"]) == 1
    assert "the disk is full" in capsys.readouterr().err
    assert os.listdir(small_disk) == [os.path.basename(earlier)]
    assert open(earlier, "rb").read() == b"an earlier archive"


def test_restore_streams_twice_when_the_disk_cannot_stage_it(helper_env, make_volume, small_disk,
                                                             tmp_path, monkeypatch, capsys):
    source = make_volume()
    testkit.fill_volume(source, testkit.make_tricky_tree(tmp_path / "tricky").decode())
    assert cli.backup_docker_volume_main([source, str(tmp_path / "a"), "--quiet"]) == 0
    archive = testkit.only_archive(tmp_path / "a")
    monkeypatch.setenv("BACKUP_DIR", small_disk)  # 3 MiB: no room to stage 3+ MiB of tar
    target = make_volume()  # not empty: it has something to lose, so the archive is checked
    (tmp_path / "old").mkdir()  # completely before the volume changes
    (tmp_path / "old" / "data").write_text("old")
    testkit.fill_volume(target, tmp_path / "old")
    assert cli.restore_docker_volume_main([target, archive, "--force", "--quiet",
                                           "--no-safety-backup"]) == 0  # no room for it here
    assert "streaming it in a second pass" in capsys.readouterr().err
    assert testkit.volume_state(target) == testkit.volume_state(source)
    assert without_locks(os.listdir(small_disk)) == []
    # A volume with nothing to lose is filled in one pass, checked as it streams: no staging.
    fresh = make_volume(create=False)
    assert cli.restore_docker_volume_main([fresh, archive, "--force", "--quiet"]) == 0
    assert "second pass" not in capsys.readouterr().err
    assert testkit.volume_state(fresh) == testkit.volume_state(source)
    assert without_locks(os.listdir(small_disk)) == []


def test_stdin_into_a_new_volume_is_read_once_and_never_kept(helper_env, make_volume, small_disk,
                                                             tmp_path):
    """The new-host path (`age -d … | restore … -`): a volume that does not exist is filled as
    the stream comes, so the work folder needs no room for the archive (3 MiB here, for a
    larger one), and a hostile stream still changes nothing."""
    source = make_volume()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "blob").write_bytes(os.urandom(5 * 1024 * 1024))
    testkit.fill_volume(source, tmp_path / "data")
    archive = backup_of(source, tmp_path / "archives")
    script = os.path.join(SCRIPTS, "restore_docker_volume.py")
    environment = dict(os.environ, BACKUP_DIR=small_disk)
    target = make_volume(create=False)
    with open(archive, "rb") as stream:
        result = subprocess.run([sys.executable, script, target, "-", "--force", "--quiet"],
                                stdin=stream, capture_output=True, env=environment)
    assert result.returncode == 0, result.stderr
    assert testkit.volume_state(target) == testkit.volume_state(source)
    assert without_locks(os.listdir(small_disk)) == []
    hostile = write(tmp_path / "hostile.tar.gz", gz(raw_tar(
        [entry("./", tarfile.DIRTYPE), entry("./fine", data=b"x")] + HOSTILE["dot-dot"],
        tarfile.GNU_FORMAT)))
    refused = make_volume(create=False)
    with open(hostile, "rb") as stream:
        result = subprocess.run([sys.executable, script, refused, "-", "--force"],
                                stdin=stream, capture_output=True, env=environment)
    assert result.returncode == 1
    assert b"is refused [%s]" % HOSTILE_RULES["dot-dot"].encode() in result.stderr
    assert not testkit.volume_exists(refused)


# --- safety backup and rollback ------------------------------------------------------

def backup_of(volume, folder):
    assert cli.backup_docker_volume_main([volume, str(folder), "--quiet"]) == 0
    return testkit.archives_in(folder)[-1]


def test_safety_backup_is_an_ordinary_archive(helper_env, small_volume, make_volume, tmp_path,
                                              capsys, monkeypatch, own_backup_dir):
    volume, original = small_volume
    other = make_volume()
    testkit.fill_volume(other, testkit.make_tricky_tree(tmp_path / "tricky").decode())
    archive = backup_of(other, tmp_path / "archives")
    capsys.readouterr()
    assert cli.restore_docker_volume_main([volume, archive, "--force"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert testkit.archives_in(tmp_path / "archives") == [archive]
    snapshots = [os.path.basename(path) for path in testkit.archives_in(own_backup_dir)
                 if os.path.basename(path).startswith(volume + "__")]
    assert len(snapshots) == 1  # in the (private) backup folder, never next to the archive
    snapshot = os.path.join(str(own_backup_dir), snapshots[0])
    assert out[2] == "Safety backup of the current contents: %s" % snapshot
    assert out[-1] == "Previous contents kept in: %s" % snapshot
    assert testkit.volume_state(volume) == testkit.volume_state(other)
    check = make_volume(create=False)
    assert cli.restore_docker_volume_main([check, snapshot, "--force"]) == 0
    assert testkit.volume_state(check) == original
    # With BACKUP_DIR set, the safety backup goes there.
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path / "configured"))
    assert cli.restore_docker_volume_main([check, archive, "--force", "--quiet"]) == 0
    configured = testkit.archives_in(tmp_path / "configured")
    assert [os.path.basename(path).split("__")[0] for path in configured] == [check]


def test_no_safety_backup_of_an_empty_volume_or_when_declined(helper_env, small_volume,
                                                              make_volume, tmp_path,
                                                              own_backup_dir, capsys):
    volume, original = small_volume
    archive = backup_of(volume, tmp_path / "archives")
    empty = make_volume()
    assert cli.restore_docker_volume_main([empty, archive, "--force"]) == 0
    assert testkit.volume_state(empty) == original
    testkit.fill_volume(volume, tmp_path)  # something to lose, with no safety copy taken
    assert cli.restore_docker_volume_main([volume, archive, "--force", "--no-safety-backup"]) == 0
    assert testkit.volume_state(volume) == original
    assert "Safety backup" not in capsys.readouterr().out
    assert testkit.archives_in(tmp_path / "archives") == [archive]
    assert testkit.archives_in(own_backup_dir) == []  # where a safety copy would have gone


def told_words(monkeypatch):
    """Record every word the restore hands its waiting helper (``transfer._tell``)."""
    told = []
    real = transfer._tell

    def tell(folder, helper, what, mode, fifo=transfer.GO):
        told.append(mode)
        return real(folder, helper, what, mode, fifo)
    monkeypatch.setattr(transfer, "_tell", tell)
    return told


def test_a_restore_over_a_full_volume_removes_the_old_contents_while_it_extracts(
        helper_env, make_volume, tmp_path, monkeypatch, own_backup_dir):
    """With room for both, the old contents are set aside and removed during extraction:
    the volume is then exactly the archive (hidden entries and the top folder's owner, mode
    and mtime included), and nothing is left of the old contents or the folder they were
    set aside in."""
    old_tree = testkit.make_tricky_tree(tmp_path / "old")
    for name in (b"stale-top-file", b".stale-hidden", b"..stale-dots"):
        (tmp_path / "old" / os.fsdecode(name)).write_bytes(b"old " + name)
    os.chmod(old_tree, 0o700)
    volume = make_volume()
    testkit.fill_volume(volume, old_tree.decode())
    new_tree = testkit.make_tricky_tree(tmp_path / "new")
    (tmp_path / "new" / "app" / "backend" / "data" / "added").write_text("new")
    os.chmod(new_tree, 0o751)
    source = make_volume()
    testkit.fill_volume(source, new_tree.decode())
    archive = backup_of(source, tmp_path / "archives")
    told = told_words(monkeypatch)
    # The restore's own word comes last, after the safety copy's.
    assert word_of_restore(volume, archive, told) == "aside"
    assert testkit.volume_state(volume) == testkit.volume_state(source)


def word_of_restore(volume, archive, told, *options):
    """Restore ``archive`` into ``volume``; give the word its helper was told last."""
    assert cli.restore_docker_volume_main([volume, archive, "--force", "--quiet"] +
                                          list(options)) == 0
    return told[-1]


def bound_restore(folder, make_volume, tmp_path, old, new):
    """A volume kept in ``folder`` holding the files ``old`` (name: bytes, also left in
    tmp_path/old), and an archive of another volume holding ``new``; gives (the volume,
    the other volume, the archive)."""
    volume = volume_on(folder, make_volume, tmp_path)
    source = make_volume()
    for name, contents, target in (("old", old, volume), ("new", new, source)):
        (tmp_path / name).mkdir()
        for file_name, data in contents.items():
            (tmp_path / name / file_name).write_bytes(data)
        testkit.fill_volume(target, tmp_path / name)
    return volume, source, backup_of(source, tmp_path / "archives")


def test_a_volume_without_room_for_both_is_emptied_before_it_is_filled(
        helper_env, make_volume, public_tmp, tmp_path, monkeypatch, own_backup_dir):
    """On a filesystem that cannot hold the old and the new contents at once (beside the
    staging reserve), the volume is emptied first, as before."""
    with own_tmpfs(public_tmp, "no-room-for-both", "size=32m") as folder:
        volume = volume_on(folder, make_volume, tmp_path)
        other = make_volume()
        testkit.fill_volume(other, testkit.make_tricky_tree(tmp_path / "tricky").decode())
        archive = backup_of(other, tmp_path / "archives")
        assert word_of_restore(volume, archive, told_words(monkeypatch)) == "go"
        assert bound_state(folder) == testkit.volume_state(other)


def test_the_safety_copy_counts_against_the_room_for_both(
        helper_env, make_volume, public_tmp, tmp_path, monkeypatch, own_backup_dir):
    """1200 MiB, 60 MiB of it the volume's: 116 MiB beside a 1 GiB reserve, for 40 MiB of
    archive and its 40 MiB staged. The safety copy (60 MiB, written after the volume was
    measured) leaves no room for both: the volume is emptied first. Without a safety copy
    there is room, and the old contents are set aside."""
    with own_tmpfs(public_tmp, "room-for-both", "size=1200m") as folder:
        volume, source, archive = bound_restore(
            folder, make_volume, tmp_path, {"old-data": os.urandom(60 << 20)},
            {"new-data": os.urandom(40 << 20)})
        told = told_words(monkeypatch)
        assert word_of_restore(volume, archive, told) == "go"
        assert bound_state(folder) == testkit.volume_state(source)
        os.unlink(os.path.join(folder, "volume-data", "new-data"))  # the same 60 MiB again
        testkit.fill_volume(volume, tmp_path / "old")
        assert word_of_restore(volume, archive, told, "--no-safety-backup") == "aside"
        assert bound_state(folder) == testkit.volume_state(source)


def test_a_volume_without_inodes_for_both_is_emptied_before_it_is_filled(
        helper_env, make_volume, public_tmp, tmp_path, monkeypatch, own_backup_dir):
    """Bytes to spare, but 200 inodes: 151 files there and 100 in the archive fit one after
    the other, not side by side."""
    with own_tmpfs(public_tmp, "few-inodes-for-both", "size=1200m,nr_inodes=200") as folder:
        volume, source, archive = bound_restore(
            folder, make_volume, tmp_path,
            {"old-%03d" % index: b"old %d" % index for index in range(150)},
            {"new-%03d" % index: b"new %d" % index for index in range(99)})
        assert word_of_restore(volume, archive, told_words(monkeypatch)) == "go"
        assert bound_state(folder) == testkit.volume_state(source)


def test_a_backup_names_the_old_contents_an_interrupted_restore_left(
        helper_env, make_volume, tmp_path, capsys, own_backup_dir):
    """A folder set aside by a restore that was stopped before it removed it is backed up
    with the rest and named in a warning with the command that removes it; names that only
    look like one (a file, a symlink, another length) are not. A restore over the volume
    removes it without that warning (its safety copy holds it)."""
    tree = tmp_path / "tree"
    left = tree / ".ai_stack_backup-old-Ab12Cd"
    (left / "app").mkdir(parents=True)
    (left / "app" / "webui.db").write_bytes(b"the contents before the restore")
    (tree / ".ai_stack_backup-old-toolong").mkdir()
    (tree / ".ai_stack_backup-old-File01").write_bytes(b"a file")
    os.symlink("/", str(tree / ".ai_stack_backup-old-Link01"))
    (tree / "webui.db").write_bytes(b"the restored contents")
    volume = make_volume()
    testkit.fill_volume(volume, tree)
    capsys.readouterr()
    archive = backup_of(volume, tmp_path / "archives")
    warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    image = os.environ["BACKUP_HELPER_IMAGE"]
    command = "docker run --rm --network none -v %s:/volume %s rm -rf /volume/%s" % (
        volume, image, left.name)
    assert len(warnings) == 1, warnings
    assert "volume %s holds %s, the old contents a restore set aside" % (
        volume, left.name) in warnings[0]
    assert warnings[0].endswith(command)
    with tarfile.open(archive) as opened:
        assert opened.extractfile("./%s/app/webui.db" % left.name).read() == \
            b"the contents before the restore"
    subprocess.run(command.split(), check=True, capture_output=True)
    backup_of(volume, tmp_path / "after")
    assert "WARNING" not in capsys.readouterr().err
    testkit.fill_volume(volume, tree)  # left behind again
    source = make_volume()
    testkit.fill_volume(source, testkit.make_tricky_tree(tmp_path / "tricky").decode())
    other = backup_of(source, tmp_path / "other")
    capsys.readouterr()
    assert cli.restore_docker_volume_main([volume, other, "--force", "--quiet"]) == 0
    assert "WARNING" not in capsys.readouterr().err
    assert testkit.volume_state(volume) == testkit.volume_state(source)


# The background removal of the set-aside contents fails (only in a restore told ``aside``;
# the rollback's own wipe works).
FAILING_REMOVAL = (b'rm() { if [ "${mode:-}" = aside ]; then case "$*" in '
                   b'*ai_stack_backup-old-*) return 1;; esac; fi; busybox rm "$@"; }')


def test_old_contents_that_cannot_be_removed_roll_the_restore_back(
        helper_env, small_volume, make_volume, tmp_path, monkeypatch, own_backup_dir, capsys):
    volume, original = small_volume
    other = make_volume()
    testkit.fill_volume(other, testkit.make_tricky_tree(tmp_path / "tricky").decode())
    archive = backup_of(other, tmp_path / "archives")
    image = testkit.build_variant_image("failing-removal", b'busybox tar "$@"', FAILING_REMOVAL)
    monkeypatch.setenv("BACKUP_HELPER_IMAGE", image)
    capsys.readouterr()
    assert cli.restore_docker_volume_main([volume, archive, "--force", "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "cannot remove the volume's old contents in /volume/.ai_stack_backup-old-" in error
    assert "was rolled back to its previous contents from the safety backup" in error, error
    assert testkit.volume_state(volume) == original


@pytest.fixture
def slow_image(engine):
    """This test's own tag of the image whose tar extraction hangs: the test may retag it to
    the plain helper (so a rollback runs at normal speed) without touching another run's."""
    base = testkit.build_variant_image("slow-extract", SLOW_EXTRACT)
    tag = "%sslow-%s:%s" % (testkit.IMAGE_PREFIX, secrets.token_hex(5), testkit.IMAGE_TAG)
    testkit.docker("tag", base, tag)
    yield tag
    subprocess.run(["docker", "rmi", tag], capture_output=True)  # only the tag goes


def restore_caught_after_the_wipe(engine, volume, tmp_path, make_volume, slow_image):
    """Start a restore of another tree whose helper stops right after emptying the volume.

    Gives the running restore process once the volume is empty. The plain
    helper image then takes the test's slow tag, so the rollback runs at
    normal speed.
    """
    other = make_volume()
    testkit.fill_volume(other, testkit.make_tricky_tree(tmp_path / "tricky").decode())
    archive = backup_of(other, tmp_path / "archives")  # helper_env set the plain image
    process = start_slow_restore(volume, archive, slow_image)
    wait_for(lambda: not os.listdir(testkit.mountpoint(volume)), "the wipe")
    testkit.docker("tag", engine, slow_image)
    return process


def start_slow_restore(volume, archive, image):
    """Start a restore with the slow ``image`` (``slow_image``); give the process once it has
    begun deleting the volume's data."""
    process = subprocess.Popen(
        [sys.executable, os.path.join(SCRIPTS, "restore_docker_volume.py"), volume, archive,
         "--force"], env=dict(os.environ, BACKUP_HELPER_IMAGE=image),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    for line in process.stdout:
        if line.startswith(b"WARNING: deleting existing volume data"):
            break
    return process


def test_helper_killed_after_the_wipe_rolls_back(helper_env, small_volume, make_volume,
                                                 tmp_path, slow_image):
    volume, original = small_volume
    process = restore_caught_after_the_wipe(helper_env, volume, tmp_path, make_volume,
                                            slow_image)
    for name in testkit.helper_containers(volume):
        testkit.docker("kill", name, check=False)
    process.stdout.read()
    error = process.stderr.read()
    assert process.wait(timeout=120) == 1
    assert b"was rolled back to its previous contents from the safety backup" in error
    assert testkit.volume_state(volume) == original


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_a_signal_during_a_restore_rolls_back(helper_env, small_volume, make_volume, tmp_path,
                                              slow_image, signum):
    """SIGHUP is what a dropped SSH session sends: it must roll back like SIGTERM."""
    volume, original = small_volume
    process = restore_caught_after_the_wipe(helper_env, volume, tmp_path, make_volume,
                                            slow_image)
    process.send_signal(signum)
    process.stdout.read()
    error = process.stderr.read()
    assert process.wait(timeout=120) == 128 + signum
    assert b"was rolled back to its previous contents from the safety backup" in error
    assert b"stopped by %s after cleaning up" % signal.Signals(signum).name.encode() in error
    assert testkit.volume_state(volume) == original
    wait_for(lambda: not testkit.helper_containers(volume), "the helpers to go")
    assert not [name for name in os.listdir(str(tmp_path / "archives"))
                if name.startswith(files.WORK_PREFIX)]  # no staging file left behind


def test_a_volume_without_room_is_refused_before_it_changes(helper_env, make_volume, small_disk,
                                                           tmp_path, capsys):
    volume = volume_on(small_disk, make_volume, tmp_path)
    original = bound_state(small_disk)
    big = make_volume()
    (tmp_path / "big").mkdir()
    (tmp_path / "big" / "too-big").write_bytes(os.urandom(5 * 1024 * 1024))
    testkit.fill_volume(big, tmp_path / "big")
    archive = backup_of(big, tmp_path / "archives")
    capsys.readouterr()
    assert cli.restore_docker_volume_main([volume, archive, "--force", "--quiet"]) == 1
    error = capsys.readouterr().err
    assert re.search(r"volume %s has room for about \d MiB \(\d MiB free and 0 MiB it holds "
                     r"now\), but the archive needs about 5 MiB; nothing was changed" % volume,
                     error), error
    assert "Safety backup" not in error
    assert bound_state(small_disk) == original


@pytest.fixture
def few_inodes(public_tmp):
    """A tmpfs with room for bytes but for only 64 files, the engine can see; gives its path."""
    with own_tmpfs(public_tmp, "few-inodes", "size=32m,nr_inodes=64") as path:
        yield path


def test_a_volume_that_fills_up_during_extraction_is_rolled_back(helper_env, make_volume,
                                                                 few_inodes, tmp_path,
                                                                 own_backup_dir, capsys):
    """The space check counts bytes; the filesystem runs out of files half-way through the
    extraction: the volume is put back from the safety copy."""
    volume = volume_on(few_inodes, make_volume, tmp_path)
    original = bound_state(few_inodes)
    many = make_volume()
    (tmp_path / "many").mkdir()
    for index in range(200):
        (tmp_path / "many" / ("file-%03d" % index)).write_bytes(b"x")
    testkit.fill_volume(many, tmp_path / "many")
    archive = backup_of(many, tmp_path / "archives")
    capsys.readouterr()
    assert cli.restore_docker_volume_main([volume, archive, "--force", "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "was rolled back to its previous contents from the safety backup" in error, error
    assert bound_state(few_inodes) == original
    assert len(testkit.archives_in(own_backup_dir)) == 1  # the safety copy stays, as said


def test_restore_stops_before_any_change_if_the_safety_backup_fails(
        helper_env, big_volume, small_disk, tmp_path, monkeypatch, capsys):
    (tmp_path / "tiny").mkdir()
    (tmp_path / "tiny" / "f").write_text("x")
    source = testkit.docker("volume", "create", "aisb-test-tiny-%s" % os.urandom(3).hex()).strip()
    try:
        testkit.fill_volume(source, tmp_path / "tiny")
        archive = backup_of(source, tmp_path / "archives")
    finally:
        testkit.docker("volume", "rm", "-f", source)
    before = testkit.volume_state(big_volume)
    monkeypatch.setenv("BACKUP_DIR", small_disk)  # 3 MiB cannot hold 200 MB
    assert cli.restore_docker_volume_main([big_volume, archive, "--force", "--quiet"]) == 1
    error = capsys.readouterr().err
    assert "cannot save the current contents" in error and "nothing was changed" in error
    assert "the disk is full" in error
    assert testkit.volume_state(big_volume) == before
    assert without_locks(os.listdir(small_disk)) == []


# --- one helper a restore; the wipe --------------------------------------------------

def _docker_runs_counted(tmp_path, monkeypatch):
    """Put a docker that notes each subcommand in front of the real one; give a function
    that says how many ``docker run`` there were since the last call."""
    folder = tmp_path / "counting-docker"
    folder.mkdir()
    log = tmp_path / "docker-calls"
    log.write_text("")
    real = shutil.which("docker")
    (folder / "docker").write_text('#!/bin/sh\necho "$1" >> %s\nexec %s "$@"\n' % (log, real))
    (folder / "docker").chmod(0o755)
    monkeypatch.setenv("PATH", "%s:%s" % (folder, os.environ["PATH"]))

    def runs():
        calls = log.read_text().split()
        log.write_text("")
        return calls.count("run")
    return runs


def test_a_restore_looks_at_an_existing_volume_and_restores_it_in_one_helper(
        helper_env, make_volume, tmp_path, monkeypatch, capsys):
    """The helper that measures an existing volume then waits, lists and tars it for the
    safety copy, and restores it: one container into an empty volume, and one over a full
    one."""
    source = make_volume()
    testkit.fill_volume(source, testkit.make_tricky_tree(tmp_path / "tricky").decode())
    archive = backup_of(source, tmp_path / "archives")
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    monkeypatch.setenv("BACKUP_DIR", str(work))
    runs = _docker_runs_counted(tmp_path, monkeypatch)
    target = make_volume()
    assert cli.restore_docker_volume_main([target, archive, "--force", "--quiet"]) == 0
    assert runs() == 1
    assert testkit.volume_state(target) == testkit.volume_state(source)
    (tmp_path / "today").mkdir()
    (tmp_path / "today" / "today.txt").write_text("written since the restore")
    testkit.fill_volume(target, tmp_path / "today")  # no docker run
    before = testkit.volume_state(target)
    assert cli.restore_docker_volume_main([target, archive, "--force", "--quiet"]) == 0
    assert runs() == 1
    assert testkit.volume_state(target) == testkit.volume_state(source)
    [saved] = re.findall(r"^Safety backup of the current contents: (\S+)$",
                         capsys.readouterr().out, re.M)
    copy = make_volume()  # the safety copy holds what the volume held
    assert cli.restore_docker_volume_main([copy, saved, "--force", "--quiet"]) == 0
    assert testkit.volume_state(copy) == before
    assert testkit.helper_containers(target) == []


@pytest.mark.parametrize("changed", [True, False], ids=["written copy", "linked copy"])
def test_a_safety_copy_whose_name_is_taken_is_made_a_second_later(
        helper_env, make_volume, tmp_path, monkeypatch, capsys, changed):
    """The safety copy's name is taken (an archive of the same second), which is found before
    anything is tarred (a written copy) or linked (a link to the archive, the volume being
    unchanged since): the restore's helper, still waiting to be told what to tar, is
    stopped; fresh helpers make the copy a second later and restore (three containers in
    all), and the restore goes through."""
    volume = make_volume()
    (tmp_path / "tree" / "sub").mkdir(parents=True)  # no hard link: a link needs none
    (tmp_path / "tree" / "a.txt").write_text("a")
    (tmp_path / "tree" / "sub" / "b.bin").write_bytes(os.urandom(3 << 20))
    testkit.fill_volume(volume, tmp_path / "tree")
    testkit.next_second()  # a listing with no racy entry: the record can prove "unchanged"
    archive = backup_of(volume, tmp_path / "archives")
    restored = testkit.volume_state(volume)
    if changed:
        (tmp_path / "today").mkdir()
        (tmp_path / "today" / "today.txt").write_text("written since the backup")
        testkit.fill_volume(volume, tmp_path / "today")
    before = testkit.volume_state(volume)
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    taken = work / archive_name(volume, "20300101T000000Z")
    taken.write_bytes(b"an archive of the same second")
    monkeypatch.setenv("BACKUP_DIR", str(work))
    stamps = iter(["20300101T000000Z", "20300101T000001Z"])
    monkeypatch.setattr(pipeline, "utc_timestamp", lambda: next(stamps))
    runs = _docker_runs_counted(tmp_path, monkeypatch)
    testkit.next_second()  # no ctime as new as the copy's listing
    capsys.readouterr()
    assert cli.restore_docker_volume_main([volume, archive, "--force", "--quiet"]) == 0
    assert runs() == 3
    [saved] = re.findall(r"^Safety backup of the current contents: (\S+)$",
                         capsys.readouterr().out, re.M)
    assert saved == str(work / archive_name(volume, "20300101T000001Z"))
    assert taken.read_bytes() == b"an archive of the same second"
    assert testkit.volume_state(volume) == restored
    copy = make_volume()
    assert cli.restore_docker_volume_main([copy, saved, "--force", "--quiet"]) == 0
    assert testkit.volume_state(copy) == before
    assert testkit.helper_containers(volume) == []


# busybox 1.35's ``xargs -0 -P`` hands its commands pieces of names, ``/`` among them (a few
# in every 200,000 names, measured); this one hands every command a ``/``.
SPLITTING_PARALLEL_XARGS = (b'xargs() { case " $* " in *" -P "*) busybox xargs "$@" /;; '
                            b'*) busybox xargs "$@";; esac; }')


@pytest.mark.parametrize("variant", ["busybox", "an xargs -P that splits names"])
def test_a_restore_removes_every_old_entry_and_follows_no_link(engine, make_volume, tmp_path,
                                                               monkeypatch, variant):
    """The wipe before the restore (many rm at once, then one plain rm for what is left)
    leaves nothing of the old tree, hidden and odd names at every depth included, and never
    follows a symlink out of the volume: one to the transfer folder, where the staged archive
    waits, and one to the helper's root. It hands rm no name through xargs: busybox's
    parallel xargs cuts names, and a ``/`` would empty the transfer folder too."""
    monkeypatch.setenv("BACKUP_HELPER_IMAGE", engine)
    source = make_volume()
    testkit.fill_volume(source, testkit.make_tricky_tree(tmp_path / "tricky").decode())
    archive = backup_of(source, tmp_path / "archives")
    old = tmp_path / "old"
    for folder in ("d1/d2/d3", ".h/.inner", "..dots/-rf", "many"):
        (old / folder).mkdir(parents=True)
    for name in ("d1/d2/d3/deep", ".hidden", ".h/.inner/..x", "..dots/-rf/-f", "new\nline",
                 "d1/.x"):
        (old / name).write_text("old")
    for index in range(300):
        (old / "many" / ("f%03d" % index)).write_text("old")
    for index in range(20):  # more folders at the top than one wave of rm takes
        (old / ("top%02d" % index) / "sub").mkdir(parents=True)
        (old / ("top%02d" % index) / "sub" / "file").write_text("old")
    for name, points_to in (("to-transfer", "/transfer"), ("d1/to-root", "/"),
                            ("d1/d2/to-transfer", "/transfer/")):
        os.symlink(points_to, old / name)
    target = make_volume()
    testkit.fill_volume(target, old)
    work = tmp_path / "work"
    work.mkdir(mode=0o700)
    monkeypatch.setenv("BACKUP_DIR", str(work))
    if variant != "busybox":
        monkeypatch.setenv("BACKUP_HELPER_IMAGE", testkit.build_variant_image(
            "splitting-parallel-xargs", b'busybox tar "$@"', SPLITTING_PARALLEL_XARGS))
    assert cli.restore_docker_volume_main([target, archive, "--force", "--quiet"]) == 0
    assert testkit.volume_state(target) == testkit.volume_state(source)
    saved = [name for name in os.listdir(work) if name.endswith(".tar.gz")]
    assert len(saved) == 1  # the old tree, symlinks as symlinks, in its safety copy
    with tarfile.open(os.path.join(work, saved[0])) as safety:
        assert safety.getmember("./d1/to-root").linkname == "/"
        assert safety.getmember("./many/f299").isfile()


# --- volumes in use ----------------------------------------------------------------

@pytest.fixture
def app(make_volume):
    names = []

    def start(volume):
        names.append("aisb-app-%s" % os.urandom(4).hex())
        return testkit.start_app_container(volume, names[-1])
    yield start
    for name in names:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True)


def test_restore_refuses_a_volume_in_use(helper_env, small_volume, app, tmp_path, capsys):
    volume, _ = small_volume
    archive = backup_of(volume, tmp_path / "archives")
    first, second = app(volume), app(volume)
    wait_for(lambda: testkit.starts(volume) == 2, "both apps to start")
    before = testkit.volume_state(volume)
    capsys.readouterr()
    assert cli.restore_docker_volume_main([volume, archive, "--force"]) == 1
    error = capsys.readouterr().err
    assert "in use by running container(s)" in error and first in error and second in error
    assert "--stop-containers" in error
    # The restore's own helper, which looked at the volume and waited, is neither named as a
    # user nor left behind.
    assert "ai-stack-backup-" not in error.partition("in use by")[2]
    assert testkit.helper_containers(volume) == []
    assert testkit.volume_state(volume) == before
    assert cli.restore_docker_volume_main([volume, archive, "--force", "--stop-containers"]) == 0
    assert testkit.container_running(first) and testkit.container_running(second)
    # The archive predates the containers: a replaced volume has a fresh "starts" file
    # with one line per restart (4 would mean nothing was replaced).
    wait_for(lambda: testkit.starts(volume) >= 2, "both apps to start again")
    assert testkit.starts(volume) == 2


def test_stop_containers_restarts_them_when_the_restore_fails(engine, small_volume, app,
                                                               tmp_path, monkeypatch, capsys):
    volume, original = small_volume
    monkeypatch.setenv("BACKUP_HELPER_IMAGE", engine)
    archive = backup_of(volume, tmp_path / "archives")
    running = app(volume)
    monkeypatch.setenv("BACKUP_HELPER_IMAGE",
                       testkit.build_variant_image("failing", testkit.FAILING_TAR))
    assert cli.restore_docker_volume_main([volume, archive, "--force", "--stop-containers"]) == 1
    error = capsys.readouterr().err
    assert "cannot save the current contents" in error and "simulated failure" in error
    assert "starting container %s again" % running in error
    assert testkit.container_running(running)
