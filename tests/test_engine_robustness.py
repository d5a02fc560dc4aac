"""Robustness against other users and bad luck (real engine): private work folders, one
restore per volume, archives that are always restorable, paths made absolute once."""

import contextlib
import io
import os
import shutil
import stat
import subprocess
import sys
import tarfile
import threading
import time

import pytest

import testkit
from ai_stack_backup import cli, drill, files, locks
from conftest import SCRIPTS
from test_engine_hardening import backup_of, empty_volume_with_odd_root, gz, slow_image, \
    small_volume, start_slow_restore, wait_for  # noqa: F401
from test_tarstream import entry, raw_tar

pytestmark = pytest.mark.engine


class FolderThief(threading.Thread):
    """Another user's process: swaps every transfer folder that appears in ``folder`` for a
    symlink to a folder of its own, and remembers what it caught."""

    def __init__(self, folder, loot):
        super().__init__(daemon=True)
        self.folder, self.loot = str(folder), str(loot)
        self.seen = []
        self.running = True

    def run(self):
        while self.running:
            for name in os.listdir(self.folder):
                path = os.path.join(self.folder, name)
                if name.startswith(files.WORK_PREFIX + "transfer-") and not os.path.islink(path):
                    self.seen.append(name)
                    try:
                        os.rename(path, path + ".stolen")
                        os.symlink(self.loot, path)
                    except OSError:
                        pass
            time.sleep(0.001)

    def stop(self):
        self.running = False
        self.join()


def test_work_files_never_go_to_a_folder_others_can_write(helper_env, small_volume, make_volume,
                                                          tmp_path, public_tmp, own_backup_dir):
    volume, original = small_volume
    other = make_volume()
    testkit.fill_volume(other, testkit.make_tricky_tree(tmp_path / "tricky").decode())
    shared = os.path.join(public_tmp, "shared")
    os.mkdir(shared)
    os.chmod(shared, 0o777)  # a folder every user can write, no sticky bit
    archive = backup_of(other, shared)
    loot = os.path.join(public_tmp, "loot")
    os.mkdir(loot)
    thief = FolderThief(shared, loot)
    thief.start()
    try:
        assert cli.restore_docker_volume_main([volume, archive, "--force", "--quiet"]) == 0
    finally:
        thief.stop()
    assert thief.seen == [] and os.listdir(loot) == []  # nothing of the volume leaked
    assert sorted(name for name in os.listdir(shared) if not name.startswith(files.LOCK_NAME)) \
        == [os.path.basename(archive), os.path.basename(archive) + ".listing",
            os.path.basename(archive) + ".sha256"]
    assert testkit.volume_state(volume) == testkit.volume_state(other)
    safety = [path for path in testkit.archives_in(own_backup_dir)
              if os.path.basename(path).startswith(volume)]
    assert len(safety) == 1


def test_a_backup_folder_others_can_write_is_not_used_for_work_files(
        helper_env, small_volume, tmp_path, public_tmp, monkeypatch, capsys):
    volume, _ = small_volume
    shared = os.path.join(public_tmp, "shared-backups")
    os.mkdir(shared)
    os.chmod(shared, 0o777)
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    monkeypatch.setenv("BACKUP_DIR", shared)
    monkeypatch.setenv("HOME", str(home))
    loot = os.path.join(public_tmp, "loot")
    os.mkdir(loot)
    thief = FolderThief(shared, loot)
    thief.start()
    try:
        assert cli.backup_docker_volume_main([volume, str(tmp_path / "mine"), "--quiet"]) == 0
    finally:
        thief.stop()
    assert thief.seen == [] and os.listdir(loot) == []
    private = home / ".cache" / "ai-stack-backup"
    assert "work files go to %s: the backup folder %s can be changed by other users" % (
        private, shared) in capsys.readouterr().err
    assert stat.S_IMODE(os.stat(str(private)).st_mode) == 0o700


def test_one_restore_per_volume_at_a_time(helper_env, small_volume, make_volume, tmp_path,
                                          own_backup_dir, capsys):
    volume, original = small_volume
    archive = backup_of(volume, tmp_path / "archives")
    lock = locks.host_lock_path(volume)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.write(fd, b'%d\\n' % os.getpid())\n"
        "print('held', flush=True)\n"
        "time.sleep(60)\n"), lock], stdout=subprocess.PIPE)
    try:
        assert holder.stdout.readline() == b"held\n"
        assert cli.restore_docker_volume_main([volume, archive, "--force"]) == 75
        assert "another backup or restore of volume %s (PID %d) holds the lock" % (
            volume, holder.pid) in capsys.readouterr().err
        assert cli.backup_docker_volume_main([volume, str(tmp_path / "b")]) == 75
    finally:
        holder.kill()
        holder.wait()
        os.unlink(lock)
    assert testkit.volume_state(volume) == original
    assert cli.restore_docker_volume_main([volume, archive, "--force", "--quiet"]) == 0
    assert testkit.volume_state(volume) == original  # the archive was made of it


def test_two_real_restores_of_one_volume_do_not_mix(helper_env, small_volume, make_volume,
                                                    tmp_path, slow_image):
    volume, _ = small_volume
    other = make_volume()
    testkit.fill_volume(other, testkit.make_tricky_tree(tmp_path / "tricky").decode())
    archive = backup_of(other, tmp_path / "archives")
    first = start_slow_restore(volume, archive, slow_image)
    try:
        second = subprocess.run(
            [sys.executable, os.path.join(SCRIPTS, "restore_docker_volume.py"), volume, archive,
             "--force"], capture_output=True, timeout=120)
        assert second.returncode == 75, second.stderr
        assert b"(PID %d) holds the lock" % first.pid in second.stderr
    finally:
        first.kill()
        first.wait()


def test_what_restore_refuses_is_never_published(helper_env, make_volume, tmp_path, capsys):
    volume = make_volume()
    root = testkit.mountpoint(volume)
    os.mknod(os.path.join(root, "null-copy"), 0o600 | stat.S_IFCHR, os.makedev(1, 3))
    folder = tmp_path / "backups"
    assert cli.backup_docker_volume_main([volume, str(folder)]) == 1
    error = capsys.readouterr().err
    assert "is a character device; device files are refused [device-file]" in error
    assert "nothing was published" in error
    assert not folder.exists() or os.listdir(str(folder)) == []


def test_hard_links_to_symlinks_and_fifos_restore_as_they_were(helper_env, make_volume,
                                                               tmp_path):
    volume = make_volume()
    root = testkit.mountpoint(volume)
    os.symlink("/etc/hostname", os.path.join(root, "absolute"))
    os.symlink("relative-target", os.path.join(root, "relative"))
    os.mkfifo(os.path.join(root, "pipe"))
    os.mkdir(os.path.join(root, "sub"))
    for name in ("absolute", "relative", "pipe"):
        os.link(os.path.join(root, name), os.path.join(root, "sub", name + "-link"),
                follow_symlinks=False)
    archive = backup_of(volume, tmp_path / "backups")
    assert cli.verify_backup_main([archive]) == 0
    target = make_volume(create=False)
    assert cli.restore_docker_volume_main([target, archive, "--force", "--quiet"]) == 0
    assert testkit.volume_state(target) == testkit.volume_state(volume)
    restored = testkit.mountpoint(target)
    for name in ("absolute", "relative", "pipe"):
        assert os.lstat(os.path.join(restored, name)).st_ino == \
            os.lstat(os.path.join(restored, "sub", name + "-link")).st_ino


def test_verify_and_restore_give_one_verdict(helper_env, make_volume, tmp_path, capsys):
    members = [entry("./", tarfile.DIRTYPE), entry("./big-owner", data=b"x",
                                                   pax={"uid": str(2 ** 60)})]
    archive = tmp_path / "owner.tar.gz"
    archive.write_bytes(gz(raw_tar(members, tarfile.PAX_FORMAT)))
    assert cli.verify_backup_main([str(archive)]) == 1
    assert capsys.readouterr().out.rstrip().endswith("which no Linux system has [owner-range]")
    volume = make_volume()
    assert cli.restore_docker_volume_main([volume, str(archive), "--force"]) == 1
    assert "is refused [owner-range]" in capsys.readouterr().err


def test_a_path_archive_is_not_restored_into_a_volume(helper_env, small_volume, tmp_path,
                                                      capsys):
    volume, original = small_volume
    source = tmp_path / "notes"
    (source / "sub").mkdir(parents=True)
    (source / "sub" / "a.txt").write_text("a")
    assert cli.backup_path_main([str(source), str(tmp_path / "b"), "--quiet"]) == 0
    archive = testkit.only_archive(tmp_path / "b")
    capsys.readouterr()
    assert cli.restore_docker_volume_main([volume, archive, "--force"]) == 1
    error = capsys.readouterr().err
    assert "is refused [path-archive]: it holds the one top-level entry 'notes'" in error
    assert "restore it with restore_path.py" in error
    assert testkit.volume_state(volume) == original


def test_a_failed_restore_into_an_empty_volume_puts_its_root_back(helper_env, make_volume,
                                                                  tmp_path, slow_image):
    volume = empty_volume_with_odd_root(make_volume)
    empty = testkit.volume_state(volume)
    other = make_volume()
    testkit.fill_volume(other, testkit.make_tricky_tree(tmp_path / "tricky").decode())
    archive = backup_of(other, tmp_path / "archives")
    process = start_slow_restore(volume, archive, slow_image)
    wait_for(lambda: testkit.helper_containers(volume), "the restore's helper")
    testkit.docker("tag", helper_env, slow_image)  # the rollback runs at normal speed
    for name in testkit.helper_containers(volume):
        testkit.docker("kill", name, check=False)
    error = process.stderr.read()
    assert process.wait(timeout=120) == 1
    assert b"was emptied again, its root folder's owner, mode and mtime put back" in error
    assert testkit.volume_state(volume) == empty


@pytest.mark.compat
def test_relative_folders_work_on_every_python(helper_env, small_volume, make_volume, tmp_path,
                                               monkeypatch):
    volume, original = small_volume
    monkeypatch.chdir(str(tmp_path))
    monkeypatch.setenv("BACKUP_DIR", "relative-backup-dir")
    assert cli.backup_docker_volume_main([volume, "relative", "--quiet"]) == 0
    archive = os.path.relpath(testkit.only_archive("relative"))
    target = make_volume(create=False)
    assert cli.restore_docker_volume_main([target, archive, "--force", "--quiet"]) == 0
    assert testkit.volume_state(target) == original
    shutil.rmtree("relative")


def drill_volumes():
    """The scratch volumes of drills run by this test process (an operator's own drill may
    run on the same host: never look at those)."""
    return set(testkit.docker("volume", "ls", "-q", "--filter", "label=%s=%d" % (
        drill.OWNER_LABEL, os.getpid())).split())


def failed_drill(volume, variant, tar_function, monkeypatch):
    """Drill ``volume`` with the helper variant whose tar is ``tar_function``: it must fail
    (exit 1) and leave no scratch volume; give what it printed."""
    monkeypatch.setenv("BACKUP_HELPER_IMAGE", testkit.build_variant_image(variant,
                                                                          tar_function))
    scratch_before = drill_volumes()
    output = io.StringIO()
    with contextlib.redirect_stdout(output):
        assert cli.drill_restore_main([volume, "--quiet"]) == 1
    assert drill_volumes() == scratch_before
    return output.getvalue()


# Extracts as busybox does, then loses one file and changes another.
LOSSY_EXTRACT = (b'busybox tar "$@" || return $?; case "$1" in -x*) rm -f /volume/a/one.txt; '
                 b'echo tampered >> /volume/b/three.txt;; esac')

METADATA_LOSING_EXTRACT = (b'busybox tar "$@" || return $?; case "$1" in -x*) '
                           b'chmod 600 /volume/a/two.txt; touch -d @0 /volume/b/three.txt;; esac')


def test_a_drill_finds_a_restore_that_lost_or_changed_files(engine, make_volume, tmp_path,
                                                            own_backup_dir, monkeypatch):
    """The archive's side of the comparison comes from the restore's own pass over the
    archive; the restored side from reading the scratch volume back: a helper whose tar
    extracts wrongly fails the drill, naming the paths."""
    monkeypatch.setenv("BACKUP_HELPER_IMAGE", engine)
    volume = make_volume()
    for name in ("a/one.txt", "a/two.txt", "b/three.txt"):
        (tmp_path / "tree" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "tree" / name).write_text(name)
    testkit.fill_volume(volume, tmp_path / "tree")
    assert cli.backup_docker_volume_main([volume, str(own_backup_dir), "--quiet"]) == 0
    assert cli.drill_restore_main([volume, "--quiet"]) == 0
    printed = failed_drill(volume, "lossy-extract", LOSSY_EXTRACT, monkeypatch)
    assert printed.endswith(": the restored tree differs: 1 missing (a/one.txt); "
                            "1 different (b/three.txt)\n"), printed
    # The content intact, but a mode and an mtime not as archived.
    printed = failed_drill(volume, "metadata-losing-extract", METADATA_LOSING_EXTRACT,
                           monkeypatch)
    assert printed.endswith(": the restored tree differs: 2 different (a/two.txt, "
                            "b/three.txt)\n"), printed


# Writes the volume as busybox does, then fails (the drill's read-back: ``tar -C /volume -cf``).
FAILING_READ_BACK = (b'busybox tar "$@" || return $?; case "$*" in *" -cf "*) '
                     b'echo "tar: read error" >&2; return 2;; esac')


def test_a_drill_whose_read_back_fails_says_so_and_removes_its_volume(
        engine, make_volume, tmp_path, own_backup_dir, monkeypatch):
    """The helper that reads the scratch volume back empties it afterwards either way; the
    drill fails on tar's status, not on the wipe's, and the volume is gone."""
    monkeypatch.setenv("BACKUP_HELPER_IMAGE", engine)
    volume = make_volume()
    for index in range(40):
        (tmp_path / "tree" / ("d%02d" % index)).mkdir(parents=True)
        (tmp_path / "tree" / ("d%02d" % index) / "file").write_text(str(index))
    testkit.fill_volume(volume, tmp_path / "tree")
    assert cli.backup_docker_volume_main([volume, str(own_backup_dir), "--quiet"]) == 0
    printed = failed_drill(volume, "failing-read-back", FAILING_READ_BACK, monkeypatch)
    assert "DRILL FAILED %s" % volume in printed
    assert "reading back the drill volume %s" % drill.SCRATCH_PREFIX in printed
    assert "the helper exited with 2: tar: read error" in printed


def test_a_drill_restores_into_scratch_and_compares(helper_env, make_volume, tmp_path,
                                                    own_backup_dir, capsys):
    volume = make_volume()
    testkit.fill_volume(volume, testkit.make_tricky_tree(tmp_path / "tricky").decode())
    os.remove(os.path.join(testkit.mountpoint(volume), "app", "backend", "data", "webui.db"))
    before = testkit.volume_state(volume)
    assert cli.backup_docker_volume_main([volume, str(own_backup_dir), "--quiet"]) == 0
    capsys.readouterr()
    scratch_before = drill_volumes()
    assert cli.drill_restore_main([volume]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 1 and out[0].startswith("DRILL ok %s %s/%s__" % (
        volume, own_backup_dir, volume)), out
    assert drill_volumes() == scratch_before  # the scratch volume is gone, its lock file too
    assert not [name for name in os.listdir(locks.host_lock_folder())
                if name.startswith(locks.HOST_LOCK_PREFIX + "volume-ai-stack-backup-drill-")]
    assert not [name for name in os.listdir(str(own_backup_dir)) if name.startswith(".")]
    assert testkit.volume_state(volume) == before  # the real volume untouched
    # A newest archive that is damaged fails the drill, naming why; scratch gone again.
    time.sleep(1.1)
    assert cli.backup_docker_volume_main([volume, str(own_backup_dir), "--quiet"]) == 0
    newest = sorted(name for name in os.listdir(str(own_backup_dir))
                    if name.endswith(".tar.gz"))[-1]
    path = os.path.join(str(own_backup_dir), newest)
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0x20
    open(path, "wb").write(bytes(data))
    capsys.readouterr()
    assert cli.drill_restore_main([volume]) == 1
    out = capsys.readouterr().out
    assert out.startswith("DRILL FAILED %s %s: the archive %s is refused [" % (volume, path, path))
    assert drill_volumes() == scratch_before
    assert testkit.volume_state(volume) == before
