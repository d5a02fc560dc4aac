"""A host folder or file as a backup source and as a restore target (staging, then rename).

The archive holds one top-level entry, the source's basename, as
``tar -czf OUT -C DIRNAME BASENAME`` made it; ``hosttree`` writes it. A restore
checks the whole archive while it extracts it next to TARGET through folder
descriptors, then swaps it in by rename, so a failure leaves TARGET as it was.
"""

import contextlib
import errno
import hashlib
import os
import secrets
import stat
import time

from . import blocked
from .archive import PathShape
from .errors import BackupError, NotFound, describe_os_error
from .exclusions import NONE
from .files import WORK_PREFIX
from .gzipstream import MemberWriter
from .hosttree import TreeWriter, listing_line, walk
from .names import safe_name
from .pipeline import Restored
from .tarstream import DIRECTORY, FIFO, FILE, HARDLINK, SYMLINK


class _LiveCopy:
    mode = "live"
    pause = None
    snapshots = {}  # a path's databases are copied as they are

    def describe(self):
        return "consistency live"


class _TreePlan:
    """A host tree's counterpart of ``transfer.PlannedStream``: ``listing()`` walks the tree
    once for its listing's digest (held in memory, never written anywhere); the archive is
    then written in one more walk (``PathSource.write_planned``), which plans from what it
    finds."""

    def __init__(self, top, exclusions, reporter):
        self.top, self.exclusions, self.reporter = top, exclusions, reporter

    def listing(self):
        lines = _Lines()
        for _, arcname, status in walk(self.top, os.path.basename(self.top),
                                       self.reporter.warn, self.exclusions):
            lines.add(arcname, listing_line(arcname, status), status)
            if lines.problem:
                break
        return lines.listing()

    def send(self, mode, names=()):
        """Nothing to tell: the writing walk plans for itself."""


class _Lines:
    """A host tree's listing taken line by line (held as its digest, never written), from a
    start time taken first: ``listing()`` gives the ``blocked.Listing``."""

    def __init__(self):
        self.started = int(time.time())
        self.problem = None
        self._digest = hashlib.sha256()
        self._racy = False

    def add(self, arcname, line, status):
        if b"\n" in arcname:
            self.problem = "some names hold a line break"
        self._digest.update(line)
        self._racy = self._racy or status.st_ctime_ns // 1000000000 >= self.started

    def listing(self):
        if self.problem:
            return blocked.Listing(None, self.started, None, True, self.problem)
        return blocked.Listing(None, self.started, self._digest.hexdigest(), self._racy)


class _TreeEntry(blocked.Entry):
    """A listing Entry made from the walk, with where it is (``source``) and its ``status``:
    its fields are the status's, not parsed back from its ``line``."""

    __slots__ = ("source", "status")

    def __init__(self, line, name, source, status):
        self.line, self.name, self.path = line, name, blocked.path_of(name)
        self.source, self.status = source, status
        self.ctime, self.links = status.st_ctime_ns // 1000000000, status.st_nlink
        self.size, self.mode = status.st_size, status.st_mode

    @property
    def inode(self):
        return self.status.st_ino

    @property
    def uid(self):
        return self.status.st_uid

    @property
    def gid(self):
        return self.status.st_gid

    @property
    def mtime(self):
        return self.status.st_mtime_ns // 1000000000


class PathSource:
    """A host folder or file to back up; the archive holds one entry, its basename."""

    kind = "path"
    uses_work_folder = False

    def __init__(self, path, exclusions=NONE):
        self.name = path
        self.archive_source = safe_name(path)
        self.exclusions = exclusions

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

    def planned(self, reporter, work_folder=None):
        """Give the tool's own counterpart of the volume helper (``_TreePlan``)."""
        return contextlib.nullcontext(_TreePlan(self.name.rstrip("/"), self.exclusions,
                                                reporter))

    @staticmethod
    def listing(planned, previous=None, held=None):
        """Give the tree's ``blocked.Listing``, taken by the tool itself (the writing walk
        plans for itself: nothing is planned from it)."""
        return planned.listing()

    @staticmethod
    def writes_while_listing(previous, held):
        """The tree is listed as it is written, whatever is copied from ``previous``: the
        walk that writes plans as it goes."""
        return True

    def write_while_listing(self, output, config, progress, reporter, planned, previous,
                            exclude=()):
        """Write the archive in the walk that lists the tree; give ``(members, blocks,
        listing)`` (see ``write_planned``)."""
        lines = _Lines()
        members, blocks = self._write(output, config, progress, reporter, previous,
                                      lines.started, exclude, lines)
        listing = lines.listing()
        if listing.problem is not None:
            blocked.forget_listing(blocks)
        return members, blocks, listing

    def write_planned(self, output, config, progress, reporter, planned, listing, previous,
                      held, exclude=()):
        """Write the archive into ``output`` from the ``listing``, copying what ``previous``
        proves unchanged; give ``(members, blocks)`` (see ``volume.VolumeSource``)."""
        return self._write(output, config, progress, reporter, previous, listing.started,
                           exclude)

    def _write(self, output, config, progress, reporter, previous, started, exclude,
               lines=None):
        """Walk the tree and write its archive (``lines``: a _Lines that takes its listing
        on the way); give ``(members, blocks)``."""
        top = self.name.rstrip("/")
        tree = TreeWriter(None, reporter, top=top)  # gives each member's bytes: writes nothing
        assembler = blocked.Assembler(MemberWriter(output, config.gzip_level, config.threads),
                                      previous, progress)

        def walked():
            for path, arcname, status in walk(top, os.path.basename(top), reporter.warn,
                                              self.exclusions, exclude):
                line = listing_line(arcname, status)
                if lines is not None:
                    lines.add(arcname, line, status)
                entry = _TreeEntry(line[:-1], arcname, path, status)
                yield entry
        try:
            for kind, value in blocked.plan(walked(), previous, {}):
                if kind == blocked.REUSE:
                    assembler.copy(value)
                    continue
                self._add(value, tree, assembler, started)
            made = assembler.finish()
        except BaseException:
            assembler.writer.abort()
            raise
        finally:
            tree.close()
        what = "path %s" % self.name
        line = blocked.describe(made, previous, what)
        if line:
            reporter.log(line)
        return made.members, made.blocks

    @staticmethod
    def _add(entry, tree, made, started):
        """Write one entry the plan did not copy: a large file in pieces (read as it goes),
        anything else whole into the run."""
        status, trusted = entry.status, entry.trusted(started)
        large = stat.S_ISREG(status.st_mode) and status.st_size >= blocked.LARGE_FILE and \
            (status.st_nlink == 1 or tree.seen_as(status) is None)
        member = None if large else tree.member(entry.source, entry.name, status)
        if member:
            made.small(entry, member, b"", trusted)
            return
        if member is not None:
            made.gone()  # vanished or skipped (a socket); tree said so
            return
        with tree.streamed(entry.source, entry.name) as found:
            if found is None:
                made.gone()
                return
            header, size, chunks = found
            made.large(entry, header, size, chunks, trusted)

    def write_tar(self, output, progress, reporter, work_folder=None, exclude=(), held=None,
                  listed=None):
        """Write the tree as tar into ``output``; give the member count (``listed`` is a
        volume's; a path lists itself). Raises BackupError."""
        top = self.name.rstrip("/")
        tree = TreeWriter(output, reporter, exclude, progress, self.exclusions)
        tree.add_tree(top, os.path.basename(top))
        tree.finish()
        return tree.members


# --- restore ----------------------------------------------------------------

FOLDER_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _open_folder(name, dir_fd):
    return os.open(name, FOLDER_FLAGS, dir_fd=dir_fd)


class _HostExtractor:
    """Creates checked members below the folder open at ``root_fd``, metadata as archived.

    Every name is resolved from a folder descriptor, one component at a time
    with O_NOFOLLOW, and owners, modes and times are set on descriptors or
    with follow_symlinks=False: no symlink anywhere in a path is followed,
    whatever another user swaps meanwhile.
    """

    def __init__(self, root_fd):
        self.root_fd = root_fd
        self.as_root = os.geteuid() == 0
        self.folders = {}  # path -> its last folder member: a later entry wins, as in tar
        self._open = (None, None)  # the last folder used: (path, descriptor)

    def folder(self, path, create=True):
        """Give a descriptor of the folder ``path`` (``b""``: the root), made if missing.

        The last one is kept open: members come folder by folder.
        """
        if not path:
            return self.root_fd
        if self._open[0] == path:
            return self._open[1]
        descriptor = self._walk(path, create)
        self.close()
        self._open = (path, descriptor)
        return descriptor

    def _walk(self, path, create=False):
        """Open the folder ``path`` one component at a time; give a descriptor to close."""
        descriptor = os.dup(self.root_fd)
        for part in path.split(b"/") if path else ():
            try:
                try:
                    child = _open_folder(part, descriptor)
                except FileNotFoundError:
                    if not create:
                        raise
                    os.mkdir(part, 0o700, dir_fd=descriptor)
                    child = _open_folder(part, descriptor)
            finally:
                os.close(descriptor)
            descriptor = child
        return descriptor

    def close(self):
        if self._open[1] is not None:
            os.close(self._open[1])
            self._open = (None, None)

    def _owner(self, member, descriptor=None, name=None, parent=None):
        if self.as_root:
            if descriptor is not None:
                os.fchown(descriptor, member.uid, member.gid)
            else:
                os.chown(name, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)

    def create(self, member, data):
        folder, _, name = member.path.rpartition(b"/")
        parent = self.folder(folder)
        if member.kind != DIRECTORY:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=parent)  # a later member of the same name wins
        if member.kind == FILE:
            descriptor = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                 | os.O_CLOEXEC, 0o600, dir_fd=parent)
            try:
                _write_sparse(descriptor, data, member.size)
            except BaseException:
                os.close(descriptor)
                raise
            try:
                self._owner(member, descriptor)
                os.fchmod(descriptor, member.mode)  # after chown, which clears setuid
                os.utime(descriptor, (member.mtime, member.mtime))
            finally:
                os.close(descriptor)
        elif member.kind == DIRECTORY:
            with contextlib.suppress(FileExistsError):
                os.mkdir(name, 0o700, dir_fd=parent)
            self.folders[member.path] = member  # metadata last: contents change them
        elif member.kind == SYMLINK:
            os.symlink(member.linkname, name, dir_fd=parent)
            self._set_on_name(member, name, parent)
        elif member.kind == HARDLINK:
            target_folder, _, target_name = member.link_path.rpartition(b"/")
            source = self._walk(target_folder)
            try:
                os.link(target_name, name, src_dir_fd=source, dst_dir_fd=parent,
                        follow_symlinks=False)
            finally:
                os.close(source)
        elif member.kind == FIFO:
            os.mkfifo(name, 0o600, dir_fd=parent)
            # Opening a FIFO would block; our own 0700 staging holds it, so the name is ours.
            self._owner(member, name=name, parent=parent)
            os.chmod(name, member.mode, dir_fd=parent)
            os.utime(name, (member.mtime, member.mtime), dir_fd=parent, follow_symlinks=False)

    def _set_on_name(self, member, name, parent):
        self._owner(member, name=name, parent=parent)
        os.utime(name, (member.mtime, member.mtime), dir_fd=parent, follow_symlinks=False)

    def finish(self):
        self.close()
        # Deepest first: a folder made read-only must not block its children's metadata.
        for member in sorted(self.folders.values(), key=lambda folder: -folder.path.count(b"/")):
            descriptor = self._walk(member.path)
            try:
                self._owner(member, descriptor)
                os.fchmod(descriptor, member.mode)
                os.utime(descriptor, (member.mtime, member.mtime))
            finally:
                os.close(descriptor)


_ZEROS = bytes(1 << 20)


def _write_sparse(descriptor, data, size):
    """Write the pieces of ``data``, leaving holes where a whole piece is zeros.

    Pieces are at most 1 MiB, so a sparse file that was backed up (its holes
    read as zeros) comes back sparse instead of filling the disk.
    """
    for piece in data:
        if len(piece) <= len(_ZEROS) and piece == _ZEROS[:len(piece)]:
            os.lseek(descriptor, len(piece), os.SEEK_CUR)
            continue
        view = memoryview(piece)
        while view:
            view = view[os.write(descriptor, view):]
    os.ftruncate(descriptor, size)  # a hole at the end has no data to mark the length


def _remove_below(descriptor):
    """Remove everything inside the folder open at ``descriptor``, never following a link."""
    for entry in os.scandir(descriptor):
        if entry.is_dir(follow_symlinks=False):
            child = _open_folder(entry.name, descriptor)
            try:
                _remove_below(child)
            finally:
                os.close(child)
            os.rmdir(entry.name, dir_fd=descriptor)
        else:
            os.unlink(entry.name, dir_fd=descriptor)


def _inside(path, folder):
    """True when ``path`` is ``folder`` or lies below it (symlinks resolved)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip("/") + "/")


class PathTarget:
    """A host path to restore: extracted next to it while the archive is checked, then
    swapped in by rename, so a failure leaves it as it was. Its current contents are saved
    first as an ordinary archive, unless ``safety_copy`` is off."""

    kind = "path"
    reads_once = False  # the archive is checked completely before the swap

    def __init__(self, target, config, safety_copy=True):
        self.name = self.description = target.rstrip("/") or "/"
        self.parent = os.path.dirname(os.path.abspath(self.name))
        self.backup_dir = config.backup_dir
        self.safety_copy = safety_copy

    def check(self, archive_path):
        if self.name == "/" or not os.path.isdir(self.parent):
            raise BackupError("cannot restore to %s: its parent folder %s does not exist"
                              % (self.name, self.parent))
        # The swap replaces everything below TARGET: archives there would go with it.
        for what, path in (("the archive", archive_path), ("the backup folder", self.backup_dir)):
            if path != "-" and os.path.lexists(path) and _inside(path, self.name):
                raise BackupError("%s %s lies inside %s, which the restore replaces as a whole; "
                                  "move it out first (or set BACKUP_DIR elsewhere); nothing was "
                                  "changed" % (what, path, self.name))

    def prepare(self, reporter):
        pass

    @contextlib.contextmanager
    def staged(self, archive, work_folder, progress, reporter):
        """Check the archive and extract it into a staging folder in one pass; give a _Staging.

        The staging folder is made next to TARGET (a rename cannot cross
        filesystems) and used only through descriptors, so another user who
        can write TARGET's parent gains nothing by swapping it. Raises
        ArchiveError; the staging folder always goes.
        """
        if self.safety_copy and _inside(work_folder, self.name):
            raise BackupError("the work folder %s, where the safety copy would go, lies inside "
                              "%s; set BACKUP_DIR to a folder outside it; nothing was changed"
                              % (work_folder, self.name))
        staging = _Staging(self.parent)
        try:
            top = PathShape()
            check = archive.check(progress, top)
            extractor = _HostExtractor(staging.tree)
            try:
                for member in check.members:
                    extractor.create(member, check.data())
                extractor.finish()
            except OSError as error:
                raise BackupError("extracting %s failed: %s; %s was not changed"
                                  % (archive.name, describe_os_error(error), self.name))
            finally:
                extractor.close()
            staging.top = top.name
            yield staging
        finally:
            staging.remove()

    def apply(self, staged, archive, reporter, save_copy):
        """Swap the staged tree in; give a ``pipeline.Restored`` (no undo: the swap is
        atomic, and restore_all restores a path last, so nothing after it can fail)."""
        closing = []
        if self.safety_copy and os.path.lexists(self.name):
            try:
                saved = save_copy(PathSource(self.name),
                                  archive.name if archive.name != "-" else None)
            except BackupError as error:
                raise BackupError("cannot save the current contents of %s before the restore, "
                                  "so nothing was changed: %s" % (self.name, error))
            reporter.status("Safety backup of the current contents: %s" % saved.path)
            closing.append("Previous contents kept in: %s" % saved.path)
        staged.swap_in(os.fsencode(os.path.basename(self.name)), self.name)
        return Restored(closing, None)


class _Staging:
    """A private staging folder beside TARGET, held by descriptors: ``parent``, ``folder``
    (the staging folder) and ``tree`` (where the archive is extracted; a subfolder, so no
    archived name can meet the name the old TARGET gets)."""

    def __init__(self, parent):
        self.name = (WORK_PREFIX + "restore-" + secrets.token_hex(8)).encode()
        self.parent = self.folder = self.tree = None
        self.top = None
        try:
            self.parent = os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            os.mkdir(self.name, 0o700, dir_fd=self.parent)
            self.folder = _open_folder(self.name, self.parent)
            status = os.fstat(self.folder)
            if status.st_uid != os.geteuid() or stat.S_IMODE(status.st_mode) != 0o700:
                raise OSError(errno.EPERM, "the staging folder was replaced by another one")
            os.mkdir(b"tree", 0o700, dir_fd=self.folder)
            self.tree = _open_folder(b"tree", self.folder)
        except OSError as error:
            self.remove()
            raise BackupError("cannot create a staging folder in %s: %s"
                              % (parent, describe_os_error(error)))

    def swap_in(self, target_name, shown):
        """Replace the entry ``target_name`` of the parent by the staged top-level entry."""
        had_target = True
        try:
            try:
                os.rename(target_name, b"previous", src_dir_fd=self.parent,
                          dst_dir_fd=self.folder)
            except FileNotFoundError:
                had_target = False
            try:
                os.rename(self.top, target_name, src_dir_fd=self.tree, dst_dir_fd=self.parent)
            except OSError:
                if had_target:
                    os.rename(b"previous", target_name, src_dir_fd=self.folder,
                              dst_dir_fd=self.parent)
                raise
        except OSError as error:
            raise BackupError("cannot put the restored %s in place: %s; %s was not changed"
                              % (shown, describe_os_error(error), shown))
        os.fsync(self.parent)

    def remove(self):
        """Remove the staging folder (the old TARGET with it), through the descriptors."""
        if self.folder is not None:
            with contextlib.suppress(OSError):
                _remove_below(self.folder)
            with contextlib.suppress(OSError):
                # By name, last: if someone moved the folder, this removes nothing of ours.
                os.rmdir(self.name, dir_fd=self.parent)
        for descriptor in (self.tree, self.folder, self.parent):
            if descriptor is not None:
                os.close(descriptor)
        self.parent = self.folder = self.tree = None
