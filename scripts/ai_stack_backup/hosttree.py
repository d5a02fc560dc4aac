"""A host folder written as a tar stream, as ``tar -cf - -C DIRNAME BASENAME`` would write it.

Headers are GNU format, byte for byte what ``tarfile`` writes
(``tarstream.encode_header``, held to it by the tests): long and non-UTF-8 names
survive, and GNU tar and busybox extract it without a warning. Modes, owners
(with names), mtimes, symlinks (not followed), hard links, empty folders and
FIFOs are kept; sockets and device files are skipped with a warning (restore
refuses device files). Folders are opened by descriptor and never followed
through a symlink.
"""

import errno
import grp
import os
import pwd
import stat

from .errors import BackupError, describe_os_error
from .exclusions import NONE
from .files import BatchedWriter
from .tarstream import BLOCK_SIZE, DIRECTORY, END_OF_ARCHIVE, FIFO, FILE, HARDLINK, SYMLINK, \
    encode_header, padding

READ_SIZE = 1 << 20
RECORD_SIZE = 20 * BLOCK_SIZE  # tar and tarfile pad archives to whole 10 KiB records


def _names(folder):
    try:
        return sorted(os.listdir(folder))
    except OSError as error:
        raise BackupError("cannot list folder %s: %s"
                          % (os.fsdecode(folder), describe_os_error(error)))


def walk(path, arcname, warn, exclusions=NONE, exclude=()):
    """Yield ``(path, arcname, status)`` for ``path`` (followed if a symlink) and everything
    below it, each folder before its content and names sorted: the order of the archive.

    Excluded entries (and everything below an excluded folder), and the
    ``(st_dev, st_ino)`` pairs in ``exclude``, are left out; an entry gone
    before its ``lstat`` is a warning. Raises BackupError.
    """
    path, arcname = os.fsencode(path), os.fsencode(arcname)
    try:
        status = os.stat(path)
    except OSError as error:
        raise BackupError("cannot read %s: %s" % (os.fsdecode(path), describe_os_error(error)))
    yield path, arcname, status
    if not stat.S_ISDIR(status.st_mode):
        return
    stack = [(path, arcname, b"", iter(_names(path)))]
    while stack:
        folder, folder_arcname, relative, names = stack[-1]
        name = next(names, None)
        if name is None:
            stack.pop()
            continue
        child = os.path.join(folder, name)
        try:
            status = os.lstat(child)
        except FileNotFoundError:
            warn("%s vanished while it was backed up; skipped" % os.fsdecode(child))
            continue
        if (status.st_dev, status.st_ino) in exclude:
            continue
        child_relative = relative + b"/" + name if relative else name
        # What is above was matched already: an excluded folder is never entered.
        if exclusions and exclusions.matches(child_relative, stat.S_ISDIR(status.st_mode)):
            continue
        child_arcname = folder_arcname + b"/" + name
        yield child, child_arcname, status
        if stat.S_ISDIR(status.st_mode):
            stack.append((child, child_arcname, child_relative, iter(_names(child))))


def listing_line(arcname, status):
    """Give the entry's line as the helper's ``stat`` writes it (``transfer.LISTING_FORMAT``):
    ctime, inode, links, size, raw mode in hex, owner, mtime, name."""
    return b"%d %d %d %d %x %d %d %d %s\n" % (
        status.st_ctime_ns // 1000000000, status.st_ino, status.st_nlink, status.st_size,
        status.st_mode, status.st_uid, status.st_gid, status.st_mtime_ns // 1000000000,
        arcname)


class TreeWriter:
    """Writes tar members for a file tree into ``output`` (anything with ``write``).

    Paths are bytes throughout, so any name survives unchanged. ``exclude``
    holds ``(st_dev, st_ino)`` pairs never to archive (the archive being
    written, if it lies inside the tree). Hard links are tracked only for
    files with more than one link, and folders are listed one at a time, so
    memory does not grow with the number of files.
    """

    def __init__(self, output, reporter, exclude=(), progress=None, exclusions=NONE):
        self.exclude = set(exclude)
        self.exclusions = exclusions
        self.progress = progress
        self.warn = reporter.warn
        self.members = 0
        self.data_bytes = 0
        self._output = BatchedWriter(output.write)
        self._emit = self._output.write
        self._first_path = {}
        self._users = {}
        self._groups = {}
        self._buffer = bytearray(READ_SIZE)

    @staticmethod
    def _cached_name(cache, lookup, number):
        """Give the user or group name of ``number`` (``b""`` if it has none), asked once."""
        if number not in cache:
            try:
                cache[number] = os.fsencode(lookup(number)[0])
            except KeyError:
                cache[number] = b""
        return cache[number]

    def _user(self, uid):
        return self._cached_name(self._users, pwd.getpwuid, uid)

    def _group(self, gid):
        return self._cached_name(self._groups, grp.getgrgid, gid)

    def header_bytes(self, arcname, status, kind, linkname=b"", size=0):
        """Give the tar header of one entry as this writer writes it."""
        return encode_header(arcname + b"/" if kind == DIRECTORY else arcname, kind,
                             stat.S_IMODE(status.st_mode), status.st_uid, status.st_gid,
                             status.st_mtime_ns // 1000000000, size, linkname,
                             self._user(status.st_uid), self._group(status.st_gid))

    def _header(self, arcname, status, kind, linkname=b"", size=0):
        self._emit(self.header_bytes(arcname, status, kind, linkname, size))
        self.members += 1

    def _copy_file(self, path, arcname, status):
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ELOOP):
                self.warn("%s vanished while it was backed up; skipped" % os.fsdecode(path))
                return
            raise BackupError("cannot read %s: %s" % (os.fsdecode(path), describe_os_error(error)))
        try:
            opened = os.fstat(descriptor)
            if not stat.S_ISREG(opened.st_mode):
                self.warn("%s changed type while it was backed up; skipped" % os.fsdecode(path))
                return
            self._header(arcname, opened, FILE, size=opened.st_size)
            remaining = opened.st_size
            view = memoryview(self._buffer)
            while remaining:
                try:
                    count = os.readv(descriptor, [view[:min(remaining, READ_SIZE)]])
                except OSError as error:
                    raise BackupError("cannot read %s: %s"
                                      % (os.fsdecode(path), describe_os_error(error)))
                if not count:
                    self.warn("%s shrank by %d bytes while it was read; the rest is zeros"
                         % (os.fsdecode(path), remaining))
                    while remaining:
                        filler = min(remaining, READ_SIZE)
                        self._emit(bytes(filler))
                        remaining -= filler
                    break
                self._emit(view[:count])
                remaining -= count
                if self.progress is not None:
                    self.progress.advance(count)
            self._emit(padding(opened.st_size))
            self.data_bytes += opened.st_size
        finally:
            os.close(descriptor)

    def add(self, path, arcname, status):
        """Archive one entry (not its children); give True when it is a folder to descend into."""
        mode = status.st_mode
        if stat.S_ISREG(mode):
            if status.st_nlink > 1:
                key = (status.st_dev, status.st_ino)
                if key in self._first_path:
                    self._header(arcname, status, HARDLINK, linkname=self._first_path[key])
                    return False
                self._first_path[key] = arcname
            self._copy_file(path, arcname, status)
        elif stat.S_ISDIR(mode):
            self._header(arcname, status, DIRECTORY)
            return True
        elif stat.S_ISLNK(mode):
            self._header(arcname, status, SYMLINK, linkname=os.readlink(path))
        elif stat.S_ISFIFO(mode):
            self._header(arcname, status, FIFO)  # never opened, never read
        elif stat.S_ISSOCK(mode):
            self.warn("%s is a socket; skipped" % os.fsdecode(path))
        else:
            self.warn("%s is a device file; skipped (restore refuses device files)"
                 % os.fsdecode(path))
        return False

    def add_tree(self, path, arcname):
        """Archive ``path`` (followed if a symlink) and everything below it, as ``arcname``."""
        for child, child_arcname, status in walk(path, arcname, self.warn, self.exclusions,
                                                 self.exclude):
            self.add(child, child_arcname, status)

    def flush(self):
        """Hand everything written so far to the output."""
        self._output.flush()

    def seen_as(self, status):
        """Give the name a file with more than one link was first archived under, or None;
        remember ``arcname`` when it is the first (see ``first_seen``)."""
        return self._first_path.get((status.st_dev, status.st_ino))

    def first_seen(self, status, arcname):
        self._first_path[(status.st_dev, status.st_ino)] = arcname

    def finish(self):
        """Write the end-of-archive marker, padded to a whole record like tar does."""
        total = self._output.count + len(END_OF_ARCHIVE)
        self._emit(END_OF_ARCHIVE + bytes(-total % RECORD_SIZE))
        self._output.flush()
