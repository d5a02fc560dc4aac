"""Locks: an exclusive flock on a small file, and where each lock of the tool lives.

open without O_CREAT | create with O_CREAT|O_EXCL → regular file? → flock → still the file the
path names? → PID in it → … → unlinked (host locks) → closed

- One lock per volume for the whole host, in the system's lock folder
  (``/run/lock``, else ``/var/lock``): root's restore, a docker-group user's
  backup and the timer's backup_all all meet there, wherever their backup
  folders are. There is no further fallback: ``/tmp`` and ``/dev/shm`` are
  private to a unit with PrivateTmp= or PrivateDevices=, so a lock there would
  not exclude a manual run, and a per-folder lock would let two restores mix.
- backup_all's lock: one run at a time per backup folder, in that folder.

The lock folder is sticky and world-writable. Under ``fs.protected_regular``
even root may not open another user's file there with O_CREAT, so an
existing lock is opened without it and a missing one created with
O_CREAT|O_EXCL (a lost race is tried again). Host locks are 0644 (fchmod: the
umask must not decide) so that every user can open them read-only, which
is all ``flock`` needs. A symlink or FIFO planted under a lock's name is
refused, never followed. Only the flock counts, and it goes with the
process however that ends; a host lock's file is removed when it is let go,
and a taker checks after its flock that the name still is its file.
"""

import contextlib
import errno
import fcntl
import os
import stat

from .errors import BackupError, Locked, describe_os_error

HOST_LOCK_FOLDERS = ("/run/lock", "/var/lock")
HOST_LOCK_PREFIX = "ai-stack-backup-"
HOST_LOCK_MODE = 0o644  # readable by all: root's restore and the service user's timer share it
_OPEN_FLAGS = os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK  # NONBLOCK: a planted FIFO
_ATTEMPTS = 20  # races with a creator or a remover, each lost only to real progress


class LockRefused(BackupError):
    """A lock's file cannot be used: a symlink, not a regular file, or not openable."""


def open_lock_file(path, mode, dir_fd=None):
    """Open the lock file at ``path`` (relative to ``dir_fd`` if given), creating it with
    ``mode`` when missing; give the descriptor (read-write where allowed, else read-only).

    Never follows a symlink and never opens an existing file with O_CREAT.
    Raises LockRefused naming the path and the cause.
    """
    for _ in range(_ATTEMPTS):
        try:
            try:
                descriptor = os.open(path, os.O_RDWR | _OPEN_FLAGS, dir_fd=dir_fd)
            except PermissionError:  # another user's lock: a flock needs no write access
                descriptor = os.open(path, os.O_RDONLY | _OPEN_FLAGS, dir_fd=dir_fd)
        except FileNotFoundError:
            try:
                descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _OPEN_FLAGS,
                                     mode, dir_fd=dir_fd)
            except FileExistsError:
                continue  # created meanwhile by another taker: open that one
            except OSError as error:
                raise LockRefused("cannot create the lock %s: %s"
                                  % (path, describe_os_error(error)))
            os.fchmod(descriptor, mode)
        except OSError as error:
            if error.errno == errno.ELOOP:
                raise LockRefused("the lock %s is a symbolic link; refusing to follow it "
                                  "(remove it if nobody should have put it there)" % path)
            raise LockRefused("cannot open the lock %s: %s" % (path, describe_os_error(error)))
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            os.close(descriptor)
            raise LockRefused("the lock %s is not a regular file; refusing to use it "
                              "(remove it if nobody should have put it there)" % path)
        return descriptor
    raise LockRefused("cannot open the lock %s: it keeps being created and removed" % path)


def lock_holder(descriptor):
    """Give the PID of the process holding a flock on the file ``descriptor`` names, as text.

    The kernel's table (/proc/locks) names the holder whoever owns the file;
    where /proc hides it (a sandboxed unit) the PID the holder wrote is used.
    """
    status = os.fstat(descriptor)
    wanted = "%02x:%02x:%d" % (os.major(status.st_dev), os.minor(status.st_dev), status.st_ino)
    with contextlib.suppress(OSError):
        with open("/proc/locks") as table:
            for line in table:
                words = line.split()
                if len(words) > 5 and words[1] == "FLOCK" and words[5] == wanted:
                    return words[4]
    with contextlib.suppress(OSError):
        written = os.pread(descriptor, 64, 0).decode("ascii", "replace").strip()
        if written.isdigit():
            return written
    return "unknown"


class Lock:
    """An exclusive flock on ``<folder>/<name>`` that holds the owner's PID.

    Raises Locked (exit 75) naming ``holder_words`` and the holder's PID when
    another process has it, LockRefused when its file cannot be used. With
    ``remove`` the file is removed when the lock is let go (host locks: the
    lock folder is shared by every program on the host).
    """

    def __init__(self, folder, name, holder_words, mode=0o644, remove=False):
        self.path = os.path.join(folder, name)
        self.holder_words = holder_words
        self.mode, self.remove = mode, remove
        self.descriptor = None

    def __enter__(self):
        for _ in range(_ATTEMPTS):
            descriptor = open_lock_file(self.path, self.mode)
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = lock_holder(descriptor)
                os.close(descriptor)
                raise Locked("%s (PID %s) holds the lock %s; not starting"
                             % (self.holder_words, holder, self.path))
            except BaseException:
                os.close(descriptor)
                raise
            if _names(self.path, descriptor):
                break
            os.close(descriptor)  # its holder removed it as we took it: take the new one
        else:
            raise LockRefused("cannot take the lock %s: it keeps being replaced" % self.path)
        with contextlib.suppress(OSError):  # read-only: the holder's PID stays in /proc/locks
            os.ftruncate(descriptor, 0)
            os.pwrite(descriptor, b"%d\n" % os.getpid(), 0)
        self.descriptor = descriptor
        return self

    def __exit__(self, *exc_info):
        descriptor, self.descriptor = self.descriptor, None
        try:
            if self.remove and _names(self.path, descriptor):
                with contextlib.suppress(OSError):  # another user's file in a sticky folder
                    os.unlink(self.path)
            else:
                with contextlib.suppress(OSError):
                    os.ftruncate(descriptor, 0)
        finally:
            os.close(descriptor)  # closing releases the flock


def _names(path, descriptor):
    """Say whether ``path`` still names the file open at ``descriptor``."""
    try:
        named = os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    status = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (status.st_dev, status.st_ino)


def host_lock_folder(candidates=HOST_LOCK_FOLDERS):
    """Give the host-wide lock folder: the first of ``candidates`` that is a folder.

    Raises LockRefused when there is none (see the module's docstring for why
    nothing else will do).
    """
    for folder in candidates:
        if os.path.isdir(folder):
            return folder
    raise LockRefused("no host-wide lock folder: none of %s exists; create it as on Debian "
                      "(install -d -m 1777 /run/lock) so that every run on this host meets "
                      "at the same per-volume lock" % " ".join(candidates))


def host_lock_path(volume, folder=None):
    """The path of ``volume``'s host-wide lock file."""
    return os.path.join(folder or host_lock_folder(),
                        "%svolume-%s.lock" % (HOST_LOCK_PREFIX, volume))


def volume_lock(volume, folder=None):
    """The lock for one volume's backups and restores, for the whole host (see above)."""
    path = host_lock_path(volume, folder)
    return Lock(os.path.dirname(path), os.path.basename(path),
                "another backup or restore of volume %s" % volume, HOST_LOCK_MODE, remove=True)


def remove_unheld(path):
    """Remove the lock file at ``path`` if no process holds it; say whether it went."""
    try:
        descriptor = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            return False
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        if not _names(path, descriptor):
            return False
        try:
            os.unlink(path)
        except OSError:
            return False
        return True
    finally:
        os.close(descriptor)
