"""The host-wide per-volume lock and backup_all's lock, on real files and real processes.

Each test uses a sticky world-writable folder of its own standing in for /run/lock;
the engine tests (test_engine_locks.py) use the real one.
"""

import contextlib
import fcntl
import os
import stat
import subprocess
import sys

import pytest

import testkit
from ai_stack_backup import files, locks
from ai_stack_backup.errors import Locked

HOLD = r'''
import fcntl, os, sys
os.setgid(int(sys.argv[3])); os.setuid(int(sys.argv[2]))
descriptor = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(descriptor, fcntl.LOCK_EX)
print("held", flush=True)
sys.stdin.read()
'''


@pytest.fixture
def lock_folder(public_tmp):
    """Sticky and world-writable, as /run/lock, where another user can reach it."""
    folder = os.path.join(public_tmp, "lock")
    os.mkdir(folder)
    os.chmod(folder, 0o1777)
    return folder


@contextlib.contextmanager
def held_by_other_user(path):
    """A process of OTHER_UID holding an exclusive flock on ``path`` (opened read-only)."""
    process = subprocess.Popen([sys.executable, "-c", HOLD, path, str(testkit.OTHER_UID),
                                str(testkit.OTHER_GID)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE)
    try:
        assert process.stdout.readline() == b"held\n"
        yield process.pid
    finally:
        process.stdin.close()
        process.wait()


@contextlib.contextmanager
def protected_regular(value):
    """fs.protected_regular set to ``value`` for the block, then put back as it was."""
    knob = "/proc/sys/fs/protected_regular"
    with open(knob) as file:
        before = file.read().strip()
    with open(knob, "w") as file:
        file.write(str(value))
    try:
        yield
    finally:
        with open(knob, "w") as file:
            file.write(before)


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="another user's process needs root")


def test_a_volume_lock_is_exclusive_and_names_the_holder(lock_folder):
    with locks.volume_lock("owui-data", lock_folder) as held:
        assert held.path == os.path.join(lock_folder, "ai-stack-backup-volume-owui-data.lock")
        with pytest.raises(Locked, match=r"another backup or restore of volume owui-data "
                                         r"\(PID %d\) holds the lock" % os.getpid()) as raised:
            with locks.volume_lock("owui-data", lock_folder):
                pass
        assert raised.value.exit_code == 75
        with locks.volume_lock("qdrant-data", lock_folder):  # another volume: its own lock
            pass
    assert os.listdir(lock_folder) == []  # let go: the file is gone from the shared folder


def test_a_host_lock_is_0644_whatever_the_umask(lock_folder):
    old = os.umask(0o077)
    try:
        with locks.volume_lock("tm-data", lock_folder) as held:
            status = os.stat(held.path)
            assert stat.S_IMODE(status.st_mode) == 0o644
            assert stat.S_ISREG(status.st_mode)
            with open(held.path) as file:
                assert file.read() == "%d\n" % os.getpid()
    finally:
        os.umask(old)


@needs_root
def test_another_users_lock_file_still_locks_under_protected_regular(lock_folder):
    path = os.path.join(lock_folder, "ai-stack-backup-volume-owui-data.lock")
    with open(path, "w"):
        pass
    os.chown(path, testkit.OTHER_UID, testkit.OTHER_GID)
    os.chmod(path, 0o644)
    with protected_regular(2):
        with pytest.raises(PermissionError):  # what an O_CREAT open of it would do, even for root
            os.close(os.open(path, os.O_RDWR | os.O_CREAT, 0o644))
        with held_by_other_user(path) as holder:
            with pytest.raises(Locked, match=r"\(PID %d\) holds the lock" % holder):
                with locks.volume_lock("owui-data", lock_folder):
                    pass
        assert os.stat(path).st_uid == testkit.OTHER_UID
        with locks.volume_lock("owui-data", lock_folder):  # free again once the other let go
            with pytest.raises(Locked):
                with locks.volume_lock("owui-data", lock_folder):
                    pass


@needs_root
def test_a_non_root_holder_of_roots_lock_file_is_named(lock_folder):
    with locks.volume_lock("owui-data", lock_folder) as held:
        path = held.path
        os.link(path, path + ".keep")  # the name goes when root lets go; keep the file
    os.rename(path + ".keep", path)
    with held_by_other_user(path) as holder:
        with pytest.raises(Locked, match=r"\(PID %d\)" % holder):
            with locks.volume_lock("owui-data", lock_folder):
                pass


@pytest.mark.parametrize("plant", ["symlink", "fifo", "folder"])
def test_a_planted_lock_is_refused_never_followed(lock_folder, tmp_path, plant):
    path = os.path.join(lock_folder, "ai-stack-backup-volume-owui-data.lock")
    target = tmp_path / "victim"
    target.write_text("precious\n")
    if plant == "symlink":
        os.symlink(str(target), path)
        expected = "is a symbolic link; refusing to follow it"
    elif plant == "fifo":
        os.mkfifo(path)
        expected = "is not a regular file"
    else:
        os.mkdir(path)
        expected = "is not a regular file|cannot open the lock"
    with pytest.raises(locks.LockRefused, match=expected) as raised:
        with locks.volume_lock("owui-data", lock_folder):
            pass
    assert raised.value.exit_code == 1
    assert target.read_text() == "precious\n"
    assert os.path.lexists(path)  # left for a person to look at


def test_a_taker_that_lost_the_file_takes_the_new_one(lock_folder):
    """The holder removes the file as it lets go; whoever opened the old file meanwhile
    must not believe it holds the lock."""
    path = locks.host_lock_path("owui-data", lock_folder)
    first = locks.volume_lock("owui-data", lock_folder).__enter__()
    stale = os.open(path, os.O_RDONLY)  # opened before the holder let go
    first.__exit__(None, None, None)
    fcntl.flock(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the old file's flock is free...
    assert not locks._names(path, stale)  # ...but the name no longer is that file
    with locks.volume_lock("owui-data", lock_folder):
        with pytest.raises(Locked):
            with locks.volume_lock("owui-data", lock_folder):
                pass
    os.close(stale)


def test_a_taker_whose_file_was_replaced_before_its_flock_meets_the_new_holder(
        lock_folder, monkeypatch):
    """Between its open and its flock the holder let go (removing the file) and a new taker
    made and locked a new one: the flock on the old file must not count."""
    opened, new = locks.open_lock_file, []

    def opened_then_replaced(path, mode, dir_fd=None):
        descriptor = opened(path, mode, dir_fd)
        if not new:
            os.unlink(path)
            new.append(opened(path, mode, dir_fd))
            fcntl.flock(new[0], fcntl.LOCK_EX)
        return descriptor
    monkeypatch.setattr(locks, "open_lock_file", opened_then_replaced)
    try:
        with pytest.raises(Locked, match=r"\(PID %d\) holds the lock" % os.getpid()):
            with locks.volume_lock("owui-data", lock_folder):
                pass
    finally:
        os.close(new[0])


def test_letting_go_leaves_the_file_a_new_taker_made(lock_folder):
    """The holder's file was removed by hand and a new taker made and holds a new one: the
    first holder's letting go must not remove it, or a third would lock beside the second."""
    path = locks.host_lock_path("owui-data", lock_folder)
    first = locks.volume_lock("owui-data", lock_folder).__enter__()
    os.unlink(path)
    with locks.volume_lock("owui-data", lock_folder) as second:
        first.__exit__(None, None, None)
        assert locks._names(path, second.descriptor)
        with pytest.raises(Locked):
            with locks.volume_lock("owui-data", lock_folder):
                pass


def test_the_lock_folder_is_host_wide_or_refused(tmp_path):
    assert locks.host_lock_folder(("/nonexistent-a", str(tmp_path))) == str(tmp_path)
    with pytest.raises(locks.LockRefused, match="no host-wide lock folder.*install -d -m 1777"):
        locks.host_lock_folder(("/nonexistent-a", "/nonexistent-b"))
    assert locks.host_lock_folder() in locks.HOST_LOCK_FOLDERS


def test_old_per_folder_volume_locks_go_when_nobody_holds_them(tmp_path):
    unheld = tmp_path / (files.LEGACY_VOLUME_LOCK_PREFIX + "owui-data")
    held = tmp_path / (files.LEGACY_VOLUME_LOCK_PREFIX + "tm-data")
    unheld.write_text("123\n")
    held.write_text("456\n")
    backup_all_lock = tmp_path / files.LOCK_NAME
    backup_all_lock.write_text("")
    holder = os.open(str(held), os.O_RDONLY)
    fcntl.flock(holder, fcntl.LOCK_EX)
    try:
        assert files.remove_stale_work_files(str(tmp_path)) == [str(unheld)]
    finally:
        os.close(holder)
    assert sorted(os.listdir(str(tmp_path))) == sorted([held.name, backup_all_lock.name])
