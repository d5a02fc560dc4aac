"""Files in the backup folder: the folder itself, atomic archives, work files, batched writes.

Every file or folder the tool leaves in a backup folder while it works is
named ``.ai_stack_backup-…``, so a later run can recognise and remove what a
killed run left. Archives are written to a temp file beside their final
name, fsynced, published by a hard link that never overwrites, and the
folder is fsynced.
"""

import contextlib
import errno
import fcntl
import hashlib
import os
import queue
import shutil
import stat
import tempfile
import threading

from .errors import ArchiveExists, BackupError, describe_os_error
from .locks import remove_unheld

WORK_PREFIX = ".ai_stack_backup-"
TEMP_SUFFIX = ".part"  # never ".tar.gz": a temp file must not look like an archive
LOCK_NAME = WORK_PREFIX + "lock"  # backup_all's (``locks``)
# Per-volume locks of versions before the host-wide ones (``locks.volume_lock``).
LEGACY_VOLUME_LOCK_PREFIX = LOCK_NAME + "-volume-"
FOLDER_MODE = 0o700
READ_SIZE = 1 << 20


def ensure_backup_dir(path, enforce_mode=False):
    """Create the backup folder with mode 0700 when missing; give its path.

    With ``enforce_mode`` an existing folder is set to 0700 as well (backup_all
    does this on every run, as the old script did). Raises BackupError.
    """
    try:
        os.makedirs(path, mode=FOLDER_MODE)
        os.chmod(path, FOLDER_MODE)  # makedirs' mode is filtered by the umask
    except FileExistsError:
        if not os.path.isdir(path):
            raise BackupError("backup folder %s exists but is not a folder" % path)
        if enforce_mode:
            try:
                os.chmod(path, FOLDER_MODE)
            except OSError as error:
                raise BackupError("cannot set mode 0700 on backup folder %s: %s"
                                  % (path, describe_os_error(error)))
    except OSError as error:
        raise BackupError("cannot create backup folder %s: %s" % (path, describe_os_error(error)))
    return path


def is_private(path):
    """True when only this user (or root) can change what ``path`` names.

    The real path and every folder above it must be owned by this user or
    root and not writable by others; in a sticky folder (like /tmp) others
    cannot rename what is ours, so that is allowed above ``path`` itself.
    """
    path = os.path.realpath(path)
    uid = os.geteuid()
    current = path
    while True:
        status = os.lstat(current)
        if status.st_uid not in (uid, 0):
            return False
        if status.st_mode & 0o022 and (current == path or not status.st_mode & stat.S_ISVTX):
            return False
        parent = os.path.dirname(current)
        if parent == current:
            return True
        current = parent


def _usable(folder):
    """Say whether this user may keep work files in ``folder``: private, and writable."""
    return is_private(folder) and os.access(folder, os.W_OK | os.X_OK)


def private_work_folder(backup_dir, reporter, create=True):
    """Give a folder for work files (transfer folders, safety copies, spooled stdin).

    The docker daemon bind-mounts work folders by path, so nobody else may be
    able to swap one for a symlink: ``backup_dir`` when it is private to this
    user and writable, else ``~/.cache/ai-stack-backup`` (0700); the log says
    which. ``backup_dir`` is created only with ``create`` (the command was
    given it); a folder a command was not given is used only if it exists.
    """
    try:
        if create:
            ensure_backup_dir(backup_dir)
        if not os.path.isdir(backup_dir):
            reason = "does not exist"
        elif _usable(backup_dir):
            return backup_dir
        else:
            reason = "can be changed by other users, or not by this one"
    except BackupError as error:
        reason = "cannot be used (%s)" % error
    own = os.path.join(os.path.expanduser("~"), ".cache", "ai-stack-backup")
    folder = ensure_backup_dir(own)
    if not is_private(folder):
        raise BackupError("no private folder for work files: %s %s, and %s can be changed by "
                          "other users" % (backup_dir, reason, own))
    reporter.log("work files go to %s: the backup folder %s %s" % (folder, backup_dir, reason))
    return folder


def fsync_directory(path):
    """Make a rename or link inside ``path`` durable."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


CHECKSUM_SUFFIX = ".sha256"
LISTING_SUFFIX = ".listing"  # skip-if-unchanged: what the volume looked like (``unchanged``)
# Files that belong to the archive they are named after: deleted with it, and when it is gone.
SIDECAR_SUFFIXES = (CHECKSUM_SUFFIX, LISTING_SUFFIX)


def file_sha256(path):
    """Give the SHA-256 (hex) of the file at ``path``; raises OSError."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for piece in iter(lambda: file.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def _stamp(status):
    """What changes whenever a file is written to: size, mtime and ctime."""
    return status.st_size, status.st_mtime_ns, status.st_ctime_ns


class _HashingWriter:
    """Passes writes on to ``file`` and keeps the SHA-256 of what was written, taken by a
    thread of its own (hashlib lets go of the GIL), in order; ``hexdigest()`` waits for it.

    While everything given so far is the start of one other file (copied from it at the
    same offsets, or written equal to its bytes there), nothing is written: an archive
    that turns out to be that file byte for byte (``identical_to()``) need not be written
    at all. ``materialize()`` writes what was held back, with one copy.
    """

    def __init__(self, file):
        self.file = file
        self._digest = hashlib.sha256()
        self._pending = queue.Queue(32)  # bounds the bytes held for hashing
        self._thread = threading.Thread(target=self._hash, name="sha256", daemon=True)
        self._thread.start()
        self._same_source = None  # the descriptor whose start everything so far equals
        self._source_stamp = None  # its size, mtime and ctime when holding began
        self._held = 0  # bytes given but not written: the source's first ones
        self._broken = False  # something given differed: all is written as it comes

    def _hash(self):
        while True:
            data = self._pending.get()
            if data is None:
                return
            self._digest.update(data)

    def _holds(self, source, offset, data):
        """Whether ``data``, given at the current end, is ``source``'s bytes there too (a
        copy at that offset, or, ``source`` None, written bytes that equal the held-back
        file's); if so, it is held back as well."""
        if self._broken or offset != self._held:
            return False
        if source is None:
            if self._same_source is None or \
                    os.pread(self._same_source, len(data), offset) != data:
                return False
        elif self._same_source not in (None, source):
            return False
        elif self._same_source is None:
            self._same_source, self._source_stamp = source, _stamp(os.fstat(source))
        self._held += len(data)
        return True

    def _source_unchanged(self):
        return _stamp(os.fstat(self._same_source)) == self._source_stamp

    def materialize(self):
        """Write what was held back (the held-back file's first bytes), and stop holding.

        Raises BackupError if that file was written to since holding began (its ctime,
        which no one can set back, moved): the bytes checked then may not be there now.
        """
        if self._broken:
            return
        self._broken = True
        if self._held:
            if not self._source_unchanged():
                raise BackupError("the archive this one is built from changed while it was "
                                  "read; nothing was published")
            self._copy_range(self._same_source, 0, self._held, None)

    def identical_to(self):
        """Give the descriptor of the file everything given is byte for byte (None if there
        is none): its whole length was given and nothing else, and it was not written to
        since."""
        if self._broken or not self._held or not self._source_unchanged():
            return None
        if self._source_stamp[0] != self._held:
            return None
        return self._same_source

    def identical_stamp(self):
        """Give the size and mtime of the file ``identical_to`` names, as it was read."""
        return self._source_stamp[:2]

    def write(self, data):
        whole = isinstance(data, bytes)
        if self._holds(None, self._held, data):
            self._pending.put(data if whole else bytes(data))
            return len(data)
        self.materialize()
        written = self.file.write(data)
        # Kept as it is when it cannot change any more; a view of a buffer is copied.
        whole = whole and written == len(data)
        self._pending.put(data if whole else bytes(memoryview(data)[:written]))
        return written

    def copy(self, source, offset, data):
        """Append ``data``, which are the bytes of the file ``source`` (a descriptor) at
        ``offset``: by ``copy_file_range``, so that filesystems that can (XFS, btrfs) share
        the blocks instead of writing them again; by ``write`` where the kernel cannot."""
        self._pending.put(data)
        if self._holds(source, offset, data):
            return
        self.materialize()
        self._copy_range(source, offset, len(data), data)

    def _copy_range(self, source, offset, length, data):
        """Append ``length`` bytes of ``source`` from ``offset`` (``data``: those bytes, if
        at hand; else they are read where the kernel cannot copy)."""
        target = self.file.fileno()
        done = 0
        with contextlib.suppress(OSError, AttributeError):  # AttributeError: no such call
            while done < length:
                copied = os.copy_file_range(source, target, length - done, offset + done)
                if not copied:
                    break
                done += copied
        while done < length:
            piece = memoryview(data)[done:done + (1 << 20)] if data is not None else \
                os.pread(source, min(1 << 20, length - done), offset + done)
            if not piece:
                raise OSError(errno.EIO, "%d bytes short reading what was held back"
                              % (length - done))
            view = memoryview(piece)
            while view:
                written = self.file.write(view)
                view = view[written:]
                done += written

    def hexdigest(self):
        self.close()
        return self._digest.hexdigest()

    def close(self):
        if self._thread.is_alive():
            self._pending.put(None)
            self._thread.join()


def _publish_by_link(temp_path, final_path):
    """Link ``temp_path`` to ``final_path``, never overwriting; raises ArchiveExists."""
    try:
        os.link(temp_path, final_path)
    except FileExistsError:
        raise ArchiveExists("%s already exists; not overwriting it" % final_path)
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
            raise BackupError("cannot publish %s: %s" % (final_path, describe_os_error(error)))
        # Filesystems without hard links: rename, after a last existence check.
        if os.path.lexists(final_path):
            raise ArchiveExists("%s already exists; not overwriting it" % final_path)
        os.rename(temp_path, final_path)


def publish_text(path, text, replace=False):
    """Publish a small file (0600) the way archives are: a temp file in the same folder,
    fsync, link to ``path`` (never overwriting; with ``replace``, renamed over it), temp
    removed. Raises ArchiveExists when ``path`` is taken, BackupError otherwise."""
    folder = os.path.dirname(os.path.abspath(path))
    try:
        descriptor, temp = tempfile.mkstemp(prefix=WORK_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
    except OSError as error:
        raise BackupError("cannot create a file in %s: %s" % (folder, describe_os_error(error)))
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if replace:
            os.replace(temp, path)
        else:
            _publish_by_link(temp, path)
    except OSError as error:
        raise BackupError("cannot write %s: %s" % (path, describe_os_error(error)))
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


class AtomicArchive:
    """A temp file in the destination folder that is published under its final name.

    The temp file is mode 0600 (mkstemp), named ``.ai_stack_backup-….part`` and
    held with a shared flock so that a cleanup in another process can tell it is
    in use. ``publish()`` fsyncs, links it to the final name (which fails rather
    than overwrite an existing file) and fsyncs the folder; ``close()`` always
    removes the temp name. Use as a context manager.
    """

    def __init__(self, final_path):
        self.final_path = final_path
        self.folder = os.path.dirname(os.path.abspath(final_path))
        self.published = False
        if os.path.lexists(final_path):
            raise ArchiveExists("%s already exists; not overwriting it" % final_path)
        try:
            descriptor, self.temp_path = tempfile.mkstemp(
                prefix=WORK_PREFIX, suffix=TEMP_SUFFIX, dir=self.folder)
        except OSError as error:
            raise BackupError("cannot create a file in %s: %s"
                              % (self.folder, describe_os_error(error)))
        fcntl.flock(descriptor, fcntl.LOCK_SH)
        self.file = os.fdopen(descriptor, "wb", buffering=0)
        self.output = _HashingWriter(self.file)  # what the archive's writer writes to
        self.checksum_problem = None
        self.linked = None  # the path of the file it equals, if published as a link to it

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def identity(self):
        """Give ``(st_dev, st_ino)`` of the temp file, so a tree walk can leave it out."""
        status = os.fstat(self.file.fileno())
        return status.st_dev, status.st_ino

    def publish(self, checksum=False, link_identical=False):
        """Make the archive durable and visible under its final name; give its size.

        With ``link_identical``, an archive that is byte for byte the file it
        was copied from (say, the safety copy of a volume restored from the very
        archive being restored) is published as a hard link to that file
        (``linked``), where the filesystem allows one; else the held-back bytes
        are written now. With ``checksum``, ``<archive>.sha256`` of what went
        through ``output`` is published right after it; if that fails,
        ``checksum_problem`` says why (the archive stands). Raises ArchiveExists
        when the name was taken meanwhile, BackupError otherwise.
        """
        same = self.output.identical_to() if link_identical else None
        if same is not None and self._link_to(same):
            size = os.fstat(same).st_size
        else:
            try:
                self.output.materialize()
                os.fsync(self.file.fileno())
            except OSError as error:
                raise BackupError("cannot write %s: %s" % (self.final_path,
                                                           describe_os_error(error)))
            _publish_by_link(self.temp_path, self.final_path)
            size = os.fstat(self.file.fileno()).st_size
        self.published = True
        if checksum:
            try:
                self._publish_checksum()
            except BackupError as error:  # the archive itself is complete and published
                self.checksum_problem = str(error)
        fsync_directory(self.folder)
        return size

    def _link_to(self, descriptor):
        """Publish the open file ``descriptor`` under the final name by a hard link to its
        path (which /proc names); give whether it was. The link must be the very file that
        was read: one to whatever took that path since is removed again. Raises
        ArchiveExists when the name is taken."""
        try:
            target = os.readlink("/proc/self/fd/%d" % descriptor)
            os.link(target, self.final_path, follow_symlinks=False)
        except FileExistsError:
            raise ArchiveExists("%s already exists; not overwriting it" % self.final_path)
        except OSError:  # another filesystem, protected_hardlinks, no /proc: write it out
            return False
        read, linked = os.fstat(descriptor), os.lstat(self.final_path)
        # The link itself moves the ctime; size and mtime still say the data is as read.
        if (read.st_dev, read.st_ino) != (linked.st_dev, linked.st_ino) or \
                _stamp(linked)[:2] != self.output.identical_stamp():
            os.unlink(self.final_path)
            return False
        self.linked = target
        return True

    def _publish_checksum(self):
        """Publish ``<archive>.sha256`` (``sha256sum`` format) the way the archive was."""
        publish_text(self.final_path + CHECKSUM_SUFFIX, "%s  %s\n" % (
            self.output.hexdigest(), os.path.basename(self.final_path)))

    def close(self):
        self.output.close()
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp_path)


def remove_stale_work_files(folder):
    """Remove what killed runs left in ``folder``; give the removed paths.

    Only entries named ``.ai_stack_backup-*`` (temp archives, transfer folders,
    the per-volume lock files of earlier versions) that no live process holds
    a lock on are removed. backup_all's own lock stays.
    """
    removed = []
    for name in sorted(os.listdir(folder)):
        if not name.startswith(WORK_PREFIX) or name == LOCK_NAME:
            continue
        path = os.path.join(folder, name)
        if name.startswith(LOCK_NAME):
            if name.startswith(LEGACY_VOLUME_LOCK_PREFIX) and remove_unheld(path):
                removed.append(path)
            continue
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            mode = os.fstat(descriptor).st_mode
            if not stat.S_ISREG(mode) and not stat.S_ISDIR(mode):
                continue
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a running backup holds it
            if stat.S_ISDIR(mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(path)
        finally:
            os.close(descriptor)
    return removed


@contextlib.contextmanager
def spooled(source, folder):
    """Copy the binary stream ``source`` (stdin) into a private temp file in ``folder``.

    Gives the file opened for reading. A restore from stdin must read the whole
    archive before anything changes, and then read it again, so it has to be
    kept somewhere. The file is removed on exit.
    """
    try:
        descriptor, path = tempfile.mkstemp(prefix=WORK_PREFIX + "stdin-", suffix=TEMP_SUFFIX,
                                            dir=folder)
    except OSError as error:
        raise BackupError("cannot create a file in %s for the archive from stdin: %s"
                          % (folder, describe_os_error(error)))
    fcntl.flock(descriptor, fcntl.LOCK_SH)
    try:
        with os.fdopen(descriptor, "w+b") as spool:
            try:
                shutil.copyfileobj(source, spool, READ_SIZE)
                spool.flush()
            except OSError as error:
                raise BackupError("cannot store the archive from stdin in %s: %s"
                                  % (folder, describe_os_error(error)))
            spool.seek(0)
            yield spool
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


class BatchedWriter:
    """Gathers small writes into batches for ``write``; big pieces go straight through.

    Tar streams are mostly 512-byte headers and small files: one call per
    batch instead of three per member. ``count`` is every byte written so far.
    """

    BATCH = 256 * 1024

    def __init__(self, write):
        self._write = write
        self._batch = bytearray()
        self.count = 0

    def write(self, data):
        self.count += len(data)
        if len(data) >= self.BATCH:
            self.flush()
            self._write(data)
            return
        self._batch += data
        if len(self._batch) >= self.BATCH:
            self.flush()

    def flush(self):
        if self._batch:
            batch, self._batch = self._batch, bytearray()
            self._write(batch)


def pipe_writer(descriptor):
    """A BatchedWriter into a pipe descriptor (os.write may take only part of a piece)."""
    def write_all(data):
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view):]
    return BatchedWriter(write_all)
