"""A host folder or file as a backup source and as a restore target (staging, then rename).

The archive holds one top-level entry, the source's basename, as
``tar -czf OUT -C DIRNAME BASENAME`` made it. Headers are GNU format, byte for
byte what ``tarfile`` writes (``tarstream.encode_header``, held to it by the
tests): long and non-UTF-8 names survive, and GNU tar and busybox extract it
without a warning. Modes, owners (with names), mtimes, symlinks (not
followed), hard links, empty folders and FIFOs are kept; sockets and device
files are skipped with a warning (restore refuses device files).
"""

import contextlib
import errno
import grp
import os
import pwd
import shutil
import stat
import tempfile

from .errors import ArchiveError, BackupError, NotFound, describe_os_error
from .files import WORK_PREFIX, BatchedWriter, fsync_directory
from .names import safe_name
from .tarstream import BLOCK_SIZE, DIRECTORY, END_OF_ARCHIVE, FIFO, FILE, HARDLINK, SYMLINK, \
    encode_header, padding

READ_SIZE = 1 << 20
RECORD_SIZE = 20 * BLOCK_SIZE  # tar and tarfile pad archives to whole 10 KiB records


class TreeWriter:
    """Writes tar members for a file tree into ``output`` (anything with ``write``).

    Paths are bytes throughout, so any name survives unchanged. ``exclude``
    holds ``(st_dev, st_ino)`` pairs never to archive (the archive being
    written, if it lies inside the tree). Hard links are tracked only for
    files with more than one link, and folders are listed one at a time, so
    memory does not grow with the number of files.
    """

    def __init__(self, output, reporter, exclude=(), progress=None):
        self.exclude = set(exclude)
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

    def _header(self, arcname, status, kind, linkname=b"", size=0):
        self._emit(encode_header(arcname + b"/" if kind == DIRECTORY else arcname, kind,
                                 stat.S_IMODE(status.st_mode), status.st_uid, status.st_gid,
                                 status.st_mtime_ns // 1000000000, size, linkname,
                                 self._user(status.st_uid), self._group(status.st_gid)))
        self.members += 1

    def _copy_file(self, path, arcname, status):
        shown = os.fsdecode(path)
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as error:
            if error.errno in (errno.ENOENT, errno.ELOOP):
                self.warn("%s vanished while it was backed up; skipped" % shown)
                return
            raise BackupError("cannot read %s: %s" % (shown, describe_os_error(error)))
        try:
            opened = os.fstat(descriptor)
            if not stat.S_ISREG(opened.st_mode):
                self.warn("%s changed type while it was backed up; skipped" % shown)
                return
            self._header(arcname, opened, FILE, size=opened.st_size)
            remaining = opened.st_size
            view = memoryview(self._buffer)
            while remaining:
                try:
                    count = os.readv(descriptor, [view[:min(remaining, READ_SIZE)]])
                except OSError as error:
                    raise BackupError("cannot read %s: %s" % (shown, describe_os_error(error)))
                if not count:
                    self.warn("%s shrank by %d bytes while it was read; the rest is zeros"
                         % (shown, remaining))
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

    def _names(self, folder):
        try:
            return sorted(os.listdir(folder))
        except OSError as error:
            raise BackupError("cannot list folder %s: %s"
                              % (os.fsdecode(folder), describe_os_error(error)))

    def add_tree(self, path, arcname):
        """Archive ``path`` (followed if a symlink) and everything below it, as ``arcname``."""
        path, arcname = os.fsencode(path), os.fsencode(arcname)
        try:
            status = os.stat(path)
        except OSError as error:
            raise BackupError("cannot read %s: %s" % (os.fsdecode(path), describe_os_error(error)))
        if not self.add(path, arcname, status):
            return
        stack = [(path, arcname, iter(self._names(path)))]
        while stack:
            folder, folder_arcname, names = stack[-1]
            name = next(names, None)
            if name is None:
                stack.pop()
                continue
            child = os.path.join(folder, name)
            try:
                status = os.lstat(child)
            except FileNotFoundError:
                self.warn("%s vanished while it was backed up; skipped" % os.fsdecode(child))
                continue
            if (status.st_dev, status.st_ino) in self.exclude:
                continue
            child_arcname = folder_arcname + b"/" + name
            if self.add(child, child_arcname, status):
                stack.append((child, child_arcname, iter(self._names(child))))

    def finish(self):
        """Write the end-of-archive marker, padded to a whole record like tar does."""
        total = self._output.count + len(END_OF_ARCHIVE)
        self._emit(END_OF_ARCHIVE + bytes(-total % RECORD_SIZE))
        self._output.flush()


class _LiveCopy:
    def describe(self):
        return "consistency live"


class PathSource:
    """A host folder or file to back up; the archive holds one entry, its basename."""

    kind = "path"

    def __init__(self, path):
        self.name = path
        self.archive_source = safe_name(path)

    def check(self):
        if not (os.path.isdir(self.name) or os.path.isfile(self.name)):
            raise NotFound("path not found: %s" % self.name)
        if not self.name.rstrip("/"):
            raise BackupError("refusing to back up / as a path; name the folder to back up")

    def prepare(self, reporter):
        if os.path.islink(self.name.rstrip("/")):
            reporter.log("%s is a symlink; backing up what it points to" % self.name)

    def captured(self, reporter, work_folder=None):
        """A host path is always copied as it is; give what says so."""
        return contextlib.nullcontext(_LiveCopy())

    def write_tar(self, output, progress, reporter, work_folder=None, exclude=()):
        """Write the tree as tar into ``output``; give the member count. Raises BackupError."""
        top = self.name.rstrip("/")
        tree = TreeWriter(output, reporter, exclude, progress)
        tree.add_tree(top, os.path.basename(top))
        tree.finish()
        return tree.members


# --- restore ----------------------------------------------------------------

class _TopLevel:
    """Holds a path archive to its shape: every member below one top-level entry."""

    def __init__(self):
        self.name = None

    def check(self, member):
        first = member.path.split(b"/", 1)[0]
        if not first:
            raise ArchiveError("it holds the root entry %r, as volume archives do; restore it "
                               "with restore_docker_volume.py"
                               % member.name.decode("utf-8", "replace"), "volume-archive")
        if self.name is None:
            self.name = first
        elif first != self.name:
            raise ArchiveError("it has more than one top-level entry, so it is not the archive "
                               "of one path", "several-top-level-entries")


class _HostExtractor:
    """Creates checked members below ``root`` (a fresh private folder), metadata as archived."""

    def __init__(self, root):
        self.root = os.fsencode(root)
        self.as_root = os.geteuid() == 0
        self.folders = {}  # path -> its last folder member: a later entry wins, as in tar

    def _owner(self, path, member, follow=True):
        if self.as_root:
            os.chown(path, member.uid, member.gid, follow_symlinks=follow)

    def create(self, member, data):
        path = os.path.join(self.root, member.path)
        parent = os.path.dirname(path)
        if not os.path.isdir(parent):
            os.makedirs(parent, 0o700)
        if member.kind != DIRECTORY and os.path.lexists(path):
            os.unlink(path)  # a later member of the same name replaces the earlier one
        if member.kind == FILE:
            descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600)
            with open(descriptor, "wb", buffering=0) as file:
                for piece in data:
                    while piece:
                        piece = piece[file.write(piece):]
                self._owner(descriptor, member)
                os.chmod(descriptor, member.mode)  # after chown, which clears setuid
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
        elif member.kind == DIRECTORY:
            if not os.path.isdir(path):
                os.mkdir(path, 0o700)
            self.folders[member.path] = member  # metadata last: contents change them
        elif member.kind == SYMLINK:
            os.symlink(member.linkname, path)
            self._owner(path, member, follow=False)
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)
        elif member.kind == HARDLINK:
            os.link(os.path.join(self.root, member.link_path), path, follow_symlinks=False)
        elif member.kind == FIFO:
            os.mkfifo(path, 0o600)
            self._owner(path, member)
            os.chmod(path, member.mode)
            os.utime(path, (member.mtime, member.mtime), follow_symlinks=False)

    def finish(self):
        # Deepest first: a folder made read-only must not block its children's metadata.
        for member in sorted(self.folders.values(), key=lambda folder: -folder.path.count(b"/")):
            path = os.path.join(self.root, member.path)
            self._owner(path, member)
            os.chmod(path, member.mode)
            os.utime(path, (member.mtime, member.mtime))


class PathTarget:
    """A host path to restore: extracted next to it while the archive is checked, then
    swapped in by rename, so a failure leaves it as it was."""

    kind = "path"

    def __init__(self, target):
        self.name = self.description = target.rstrip("/") or "/"
        self.parent = os.path.dirname(os.path.abspath(self.name))

    def check(self):
        if self.name == "/" or not os.path.isdir(self.parent):
            raise BackupError("cannot restore to %s: its parent folder %s does not exist"
                              % (self.name, self.parent))

    def prepare(self, reporter):
        pass

    @contextlib.contextmanager
    def staged(self, archive, archive_folder, progress, reporter):
        """Check the archive and extract it into a staging folder in one pass; give the staged
        top-level entry's path. Raises ArchiveError; the staging folder always goes."""
        try:
            staging = tempfile.mkdtemp(prefix=WORK_PREFIX + "restore-", dir=self.parent)
        except OSError as error:
            raise BackupError("cannot create a staging folder in %s: %s"
                              % (self.parent, describe_os_error(error)))
        try:
            check = archive.check(progress)
            top = _TopLevel()
            # A subfolder, so no archived name can meet the name the old target gets.
            tree = os.path.join(staging, "tree")
            os.mkdir(tree, 0o700)
            extractor = _HostExtractor(tree)
            try:
                for member in check.members:
                    top.check(member)
                    extractor.create(member, check.data())
                extractor.finish()
            except OSError as error:
                raise BackupError("extracting %s failed: %s; %s was not changed"
                                  % (archive.name, describe_os_error(error), self.name))
            if top.name is None:
                raise ArchiveError("it holds no members", "no-members")
            yield staging, os.path.join(tree, os.fsdecode(top.name))
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def apply(self, staged, archive, reporter, save_copy):
        staging, new = staged
        _swap_in(new, self.name, staging)
        return []


def _swap_in(new, target, staging):
    """Replace ``target`` by ``new`` with renames; the old one ends up in ``staging``."""
    previous = os.path.join(staging, "previous")
    had_target = os.path.lexists(target)
    try:
        if had_target:
            os.rename(target, previous)
        try:
            os.rename(new, target)
        except OSError:
            if had_target:
                os.rename(previous, target)
            raise
    except OSError as error:
        raise BackupError("cannot put the restored %s in place: %s; %s was not changed"
                          % (target, describe_os_error(error), target))
    fsync_directory(os.path.dirname(os.path.abspath(target)))

