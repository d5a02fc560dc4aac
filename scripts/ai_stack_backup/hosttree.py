"""A host folder written as a tar stream, as ``tar -cf - -C DIRNAME BASENAME`` would write it.

Headers are GNU format, byte for byte what ``tarfile`` writes
(``tarstream.encode_header``, held to it by the tests): long and non-UTF-8 names
survive, and GNU tar and busybox extract it without a warning. Modes, owners
(with names), mtimes, symlinks (not followed), hard links, empty folders and
FIFOs are kept; sockets and device files are skipped with a warning (restore
refuses device files). Below the top, folders are opened by descriptor, each
from its parent, and never followed through a symlink, both to list them and to
read what they hold.
"""

import contextlib
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


FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _names(descriptor, shown):
    """Give the names in the folder open at ``descriptor``, as bytes, sorted as bytes (the
    archive's order; ``listdir`` of a descriptor gives str)."""
    try:
        return sorted(os.fsencode(name) for name in os.listdir(descriptor))
    except OSError as error:
        raise BackupError("cannot list folder %s: %s"
                          % (os.fsdecode(shown), describe_os_error(error)))


def _cannot_read(path, error):
    """Give the BackupError for ``path`` (bytes) that could not be opened or read."""
    return BackupError("cannot read %s: %s" % (os.fsdecode(path), describe_os_error(error)))


def _open_top(path):
    """Open the tree's top folder (followed if a symlink, as the source is); raises
    BackupError."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as error:
        raise _cannot_read(path, error)


def walk(path, arcname, warn, exclusions=NONE, exclude=()):
    """Yield ``(path, arcname, status)`` for ``path`` (followed if a symlink) and everything
    below it, each folder before its content and names sorted: the order of the archive.

    Below the top, folders are opened by descriptor, each from its parent
    and never through a symlink, and entries are found there: a folder
    swapped for a symlink while the tree is walked leads nowhere else (its
    contents are skipped with a warning). Excluded entries (and everything
    below an excluded folder), and the ``(st_dev, st_ino)`` pairs in
    ``exclude``, are left out; an entry gone before its ``lstat`` is a
    warning. Raises BackupError.
    """
    path, arcname = os.fsencode(path), os.fsencode(arcname)
    try:
        status = os.stat(path)
    except OSError as error:
        raise _cannot_read(path, error)
    yield path, arcname, status
    if not stat.S_ISDIR(status.st_mode):
        return
    top = _open_top(path)
    # A folder is held as its descriptor and the prefixes of its children's path, name and
    # relative name (for the exclusions): each child's is then one concatenation.
    stack = [(top, path if path.endswith(b"/") else path + b"/", arcname + b"/", b"",
              iter(_names(top, path)))]
    try:
        while stack:
            descriptor, folder, folder_arcname, relative, names = stack[-1]
            for name in names:
                child = folder + name
                try:
                    status = os.lstat(name, dir_fd=descriptor)
                except FileNotFoundError:
                    warn("%s vanished while it was backed up; skipped" % os.fsdecode(child))
                    continue
                if exclude and (status.st_dev, status.st_ino) in exclude:
                    continue
                is_folder = stat.S_ISDIR(status.st_mode)
                # What is above was matched already: an excluded folder is never entered.
                if exclusions and exclusions.matches(relative + name, is_folder):
                    continue
                child_arcname = folder_arcname + name
                yield child, child_arcname, status
                if is_folder:
                    opened = _open_folder(descriptor, name, status, child, warn)
                    if opened is None:
                        continue
                    try:
                        below = iter(_names(opened, child))
                    except BaseException:
                        os.close(opened)
                        raise
                    stack.append((opened, child + b"/", child_arcname + b"/",
                                  relative + name + b"/", below))
                    break  # its children come first; this folder's iterator goes on after
            else:
                os.close(stack.pop()[0])
    finally:
        for held in stack:
            os.close(held[0])


def _open_folder(parent, name, status, shown, warn):
    """Open the folder ``name`` in ``parent`` that the walk saw as ``status``; give its
    descriptor, or None with a warning when it is gone or no longer that folder."""
    try:
        descriptor = os.open(name, FOLDER_FLAGS, dir_fd=parent)
    except OSError as error:
        if error.errno not in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
            raise _cannot_read(shown, error)
        descriptor = None
    else:
        try:
            opened = os.fstat(descriptor)
        except BaseException:
            os.close(descriptor)
            raise
        if (opened.st_dev, opened.st_ino) != (status.st_dev, status.st_ino):
            os.close(descriptor)
            descriptor = None
    if descriptor is None:
        warn("%s vanished or changed while it was backed up; its contents are skipped"
             % os.fsdecode(shown))
    return descriptor


def listing_line(arcname, status):
    """Give the entry's line as the helper's ``stat`` writes it (``transfer.LISTING_FORMAT``):
    ctime, inode, links, size, raw mode in hex, owner, mtime, name."""
    return b"%d %d %d %d %x %d %d %d %s\n" % (
        status.st_ctime_ns // 1000000000, status.st_ino, status.st_nlink, status.st_size,
        status.st_mode, status.st_uid, status.st_gid, status.st_mtime_ns // 1000000000,
        arcname)


class TreeWriter:
    """Writes tar members for a file tree into ``output`` (anything with ``write``), or gives
    them one by one (``member``).

    Paths are bytes throughout, so any name survives unchanged. ``exclude``
    holds ``(st_dev, st_ino)`` pairs never to archive (the archive being
    written, if it lies inside the tree). Hard links are tracked only for
    files with more than one link, and folders are listed one at a time, so
    memory does not grow with the number of files.
    """

    def __init__(self, output, reporter, exclude=(), progress=None, exclusions=NONE, top=None):
        self.exclude = set(exclude)
        self.exclusions = exclusions
        self.progress = progress
        self.warn = reporter.warn
        self.members = 0
        self.data_bytes = 0
        self._first_path = {}
        self._users = {}
        self._groups = {}
        # The tree's top (a folder: paths below it are reached by descriptor, ``_place``),
        # its descriptor once opened, and the last folder used (relative path, descriptor).
        self._top = os.fsencode(top) if top is not None else None
        self._top_descriptor = None
        self._folder = (None, None)
        if output is not None:  # None: a writer asked only for members (``member``)
            self._output = BatchedWriter(output.write)
            self._emit = self._output.write

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

    def _place(self, path):
        """Give ``(folder descriptor, name)`` that reach ``path`` below the top without
        following a symlink on the way (each folder opened from its parent, as the walk
        does), or ``(None, path)`` for the top itself or with no top given. The last
        folder stays open: entries come folder by folder. Raises OSError."""
        top = self._top
        if top is None or not path.startswith(top + b"/"):
            return None, path
        folder, _, name = path[len(top) + 1:].rpartition(b"/")
        if self._folder[0] == folder:
            return self._folder[1], name
        if self._top_descriptor is None:
            self._top_descriptor = _open_top(top)
        descriptor = os.dup(self._top_descriptor)
        for part in folder.split(b"/") if folder else ():
            try:
                child = os.open(part, FOLDER_FLAGS, dir_fd=descriptor)
            finally:
                os.close(descriptor)
            descriptor = child
        self._close_folder()
        self._folder = (folder, descriptor)
        return descriptor, name

    def _close_folder(self):
        if self._folder[1] is not None:
            os.close(self._folder[1])
        self._folder = (None, None)

    def close(self):
        """Close the folders held open for reaching entries."""
        self._close_folder()
        if self._top_descriptor is not None:
            os.close(self._top_descriptor)
            self._top_descriptor = None

    def open_file(self, path):
        """Open a file the walk found, for reading; give ``(descriptor, status)``, or None
        with a warning when it vanished or is no longer a regular file. Raises BackupError."""
        # The source itself is followed if a symlink, as the walk follows it.
        flags = FILE_FLAGS & ~os.O_NOFOLLOW if path == self._top else FILE_FLAGS
        try:
            folder, name = self._place(path)
            descriptor = os.open(name, flags, dir_fd=folder)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ELOOP, errno.ENOTDIR):
                self.warn("%s vanished while it was backed up; skipped" % os.fsdecode(path))
                return None
            raise _cannot_read(path, error)
        try:
            opened = os.fstat(descriptor)
        except BaseException:
            os.close(descriptor)
            raise
        if not stat.S_ISREG(opened.st_mode):
            os.close(descriptor)
            self.warn("%s changed type while it was backed up; skipped" % os.fsdecode(path))
            return None
        return descriptor, opened

    def _read(self, descriptor, path, size):
        try:
            return os.read(descriptor, size)
        except OSError as error:
            raise _cannot_read(path, error)

    def chunks(self, descriptor, path, size):
        """Yield ``size`` bytes of an open file, READ_SIZE at most at a time; a file that
        shrank while it was read is filled up with zeros, as tar does, and a warning says
        so. Raises BackupError."""
        remaining = size
        while remaining:
            chunk = self._read(descriptor, path, min(remaining, READ_SIZE))
            if not chunk:
                self.warn("%s shrank by %d bytes while it was read; the rest is zeros"
                          % (os.fsdecode(path), remaining))
                while remaining:
                    filler = min(remaining, READ_SIZE)
                    yield bytes(filler)
                    remaining -= filler
                return
            remaining -= len(chunk)
            if self.progress is not None:
                self.progress.advance(len(chunk))
            yield chunk

    def member(self, path, arcname, status):
        """Give the whole tar member of one entry (header, data, padding) as bytes: ``b""``
        for an entry skipped with a warning (vanished, changed type, a socket or a device
        file); None for a file of READ_SIZE bytes or more once open (grown or replaced
        since the walk's ``lstat``), which is never held whole: stream it instead."""
        mode = status.st_mode
        if stat.S_ISREG(mode):
            if status.st_nlink > 1:
                first = self.seen_as(status)
                if first is not None:
                    return self._counted(self.header_bytes(arcname, status, HARDLINK,
                                                           linkname=first))
            found = self.open_file(path)
            if found is None:
                return b""
            descriptor, opened = found
            size = opened.st_size
            try:
                if size >= READ_SIZE:
                    return None
                self.archived(opened, arcname)
                data = self._read(descriptor, path, size)  # a small file whole, at once
                if self.progress is not None:
                    self.progress.advance(len(data))
                if len(data) < size:
                    data = b"".join([data, *self.chunks(descriptor, path, size - len(data))])
            finally:
                os.close(descriptor)
            self.data_bytes += size
            return self._counted(self.header_bytes(arcname, opened, FILE, size=size), data,
                                 padding(size))
        if stat.S_ISDIR(mode):
            return self._counted(self.header_bytes(arcname, status, DIRECTORY))
        if stat.S_ISLNK(mode):
            try:
                folder, name = self._place(path)
                target = os.readlink(name, dir_fd=folder)
            except OSError as error:
                if error.errno not in (errno.ENOENT, errno.EINVAL, errno.ENOTDIR, errno.ELOOP):
                    raise _cannot_read(path, error)
                self.warn("%s vanished while it was backed up; skipped" % os.fsdecode(path))
                return b""
            return self._counted(self.header_bytes(arcname, status, SYMLINK, linkname=target))
        if stat.S_ISFIFO(mode):
            return self._counted(self.header_bytes(arcname, status, FIFO))  # never opened
        if stat.S_ISSOCK(mode):
            self.warn("%s is a socket; skipped" % os.fsdecode(path))
        else:
            self.warn("%s is a device file; skipped (restore refuses device files)"
                      % os.fsdecode(path))
        return b""

    def _counted(self, header, data=b"", data_padding=b""):
        self.members += 1
        return header + data + data_padding if data else header

    def add(self, path, arcname, status):
        """Archive one entry (not its children); give True when it is a folder to descend into.
        A file of READ_SIZE bytes or more is written as it is read."""
        member = None
        if not (stat.S_ISREG(status.st_mode) and status.st_size >= READ_SIZE and
                (status.st_nlink == 1 or self.seen_as(status) is None)):
            member = self.member(path, arcname, status)
        if member is None:
            self._stream_file(path, arcname)
        else:
            self._emit(member)
        return stat.S_ISDIR(status.st_mode)

    def _stream_file(self, path, arcname):
        with self.streamed(path, arcname) as found:
            if found is not None:
                header, size, chunks = found
                self._emit(header)
                for chunk in chunks:
                    self._emit(chunk)
                self._emit(padding(size))
                self.data_bytes += size

    @contextlib.contextmanager
    def streamed(self, path, arcname):
        """Open a file to be written as it is read; give ``(header, size, chunks)`` for its
        member (``chunks``: its data, see ``chunks``), or None when it vanished or changed
        type (said in a warning). The file is closed when the block ends."""
        found = self.open_file(path)
        if found is None:
            yield None
            return
        descriptor, opened = found
        try:
            self.archived(opened, arcname)
            yield (self._counted(self.header_bytes(arcname, opened, FILE, size=opened.st_size)),
                   opened.st_size, self.chunks(descriptor, path, opened.st_size))
        finally:
            os.close(descriptor)

    def add_tree(self, path, arcname):
        """Archive ``path`` (followed if a symlink) and everything below it, as ``arcname``."""
        self._top = os.fsencode(path).rstrip(b"/") or b"/"
        try:
            for child, child_arcname, status in walk(path, arcname, self.warn, self.exclusions,
                                                     self.exclude):
                self.add(child, child_arcname, status)
        finally:
            self.close()

    def flush(self):
        """Hand everything written so far to the output."""
        self._output.flush()

    def seen_as(self, status):
        """Give the name a file with more than one link was archived under, or None (see
        ``archived``)."""
        return self._first_path.get((status.st_dev, status.st_ino))

    def archived(self, opened, arcname):
        """Remember a file with more than one name as archived under ``arcname``, by the file
        opened (``opened``: its fstat), once its data is being written: a later name is a
        hard link only to data the archive holds, never to a name that vanished or changed
        before its open."""
        if opened.st_nlink > 1:
            self._first_path[(opened.st_dev, opened.st_ino)] = arcname

    def finish(self):
        """Write the end-of-archive marker, padded to a whole record like tar does."""
        total = self._output.count + len(END_OF_ARCHIVE)
        self._emit(END_OF_ARCHIVE + bytes(-total % RECORD_SIZE))
        self._output.flush()
