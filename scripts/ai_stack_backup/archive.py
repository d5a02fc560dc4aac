"""Whole-archive checks: gzip to the end, tar structure, end marker, safety rules.

Restore, verify_backup and backup_all's read-back all use ``scan_archive``, so
an archive that verifies is exactly an archive that restores.
"""

import hashlib
import os

from .databases import DatabaseCheck
from .errors import ArchiveError, BackupError, describe_os_error
from .files import CHECKSUM_SUFFIX
from .gzipstream import iter_gunzip, prefetched
from .tarstream import FILE, ArchiveRules, TarReader

READ_SIZE = 1 << 20


class ArchiveSummary:
    """What a full check of an archive found (``databases``: DatabaseResults, if checked)."""

    def __init__(self, members, data_bytes, tar_bytes, compressed_bytes):
        self.members = members
        self.data_bytes = data_bytes
        self.tar_bytes = tar_bytes
        self.compressed_bytes = compressed_bytes
        self.databases = []
        self.checksum = None  # "ok" once a .sha256 beside the archive matched

    def damaged_databases(self):
        return [result for result in self.databases if result.problem and result.checked]

    def same_content(self, other):
        return (self.members, self.data_bytes, self.tar_bytes, self.compressed_bytes) == \
            (other.members, other.data_bytes, other.tar_bytes, other.compressed_bytes)


class CountingReader:
    """``read(size)`` over a binary file that counts bytes and feeds a Progress."""

    def __init__(self, file, progress=None):
        self.file = file
        self.progress = progress
        self.count = 0

    def read(self, size):
        data = self.file.read(size)
        self.count += len(data)
        if self.progress is not None:
            self.progress.advance(len(data))
        return data


def checked_members(file, progress=None):
    """Give ``(reader, members, counter)``: the members of a gzip tar, each checked by the rules.

    Iterating ``members`` raises ArchiveError on the first problem anywhere, up
    to the gzip trailer and end of input. Read a member's data with
    ``reader.data()`` before taking the next member.
    """
    counter = CountingReader(file, progress)
    reader = TarReader(prefetched(iter_gunzip(counter.read)))
    rules = ArchiveRules()

    def members():
        for member in reader:
            rules.check(member)
            yield member
    return reader, members(), counter


def scan_archive(file, progress=None, databases=None):
    """Read a whole gzip tar archive from ``file`` and check everything; give an ArchiveSummary.

    With ``databases`` (a DatabaseCheck) every file member is offered to it.
    Raises ArchiveError naming the first problem.
    """
    reader, members, counter = checked_members(file, progress)
    for member in members:
        if databases is not None and member.kind == FILE:
            databases.offer(member.path, reader.data())
    return ArchiveSummary(reader.members, reader.data_bytes, reader.offset, counter.count)


class VolumeShape:
    """Holds an archive to a volume's shape: refuses one that is a single path's archive.

    A volume archive holds the volume's root folder ``./`` (as the old scripts
    made it); one with no root entry and a single top-level entry is what
    backup_path makes, and restoring it would leave the volume holding only
    that folder.
    """

    def __init__(self):
        self.root = False
        self.tops = set()

    def check(self, member):
        top = member.path.split(b"/", 1)[0]
        if not top:
            self.root = True
        elif len(self.tops) < 2:
            self.tops.add(top)

    def finish(self):
        if not self.root and len(self.tops) == 1:
            raise ArchiveError("it holds the one top-level entry %r and no root folder, as "
                               "backup_path archives do; restore it with restore_path.py"
                               % next(iter(self.tops)).decode("utf-8", "replace"), "path-archive")


class PathShape:
    """Holds an archive to a path's shape: every member below one top-level entry."""

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

    def finish(self):
        if self.name is None:
            raise ArchiveError("it holds no members", "no-members")


def _shaped(members, shape):
    for member in members:
        shape.check(member)
        yield member
    shape.finish()


class CheckPass:
    """One pass over an archive: ``members`` yields each member once the rules passed it.

    Iterating raises ArchiveError on the first problem anywhere, up to the
    gzip trailer and end of input. Read a file member's data with ``data()``
    before taking the next member.
    """

    def __init__(self, archive, progress, shape=None):
        self._archive = archive
        self.reader, self.members, self._counter = checked_members(archive.file, progress)
        if shape is not None:
            self.members = _shaped(self.members, shape)

    def data(self):
        return self.reader.data()

    def run(self):
        """Check the rest of the archive; give the ArchiveSummary."""
        for _ in self.members:
            pass
        return self.summary()

    def summary(self):
        summary = ArchiveSummary(self.reader.members, self.reader.data_bytes, self.reader.offset,
                                 self._counter.count)
        if self._archive.first_summary is None:
            self._archive.first_summary = summary
        return summary


class ArchiveInput:
    """An archive opened for a restore: fresh checked passes over it, and a test for change.

    ``name`` is what messages call it (its path, or ``-``). A second pass is
    trusted only if the file's size and mtime and everything the first pass
    counted are the same.
    """

    def __init__(self, file, name):
        self.file = file
        self.name = name
        self._stamp = self._current_stamp()
        self.size = self._stamp[0]  # 0 for a pipe: no percentage then
        self.first_summary = None
        self._passes = 0

    def _current_stamp(self):
        status = os.fstat(self.file.fileno())
        return status.st_size, status.st_mtime_ns

    def check(self, progress=None, shape=None):
        """A fresh pass from the start; ``shape`` (VolumeShape, PathShape) judges the whole.

        A stream that cannot seek (stdin read once, for a volume with nothing to
        lose) gives one pass only.
        """
        if self.file.seekable():
            self.file.seek(0)
        elif self._passes:
            raise BackupError("%s can be read only once, and was read already" % self.name)
        self._passes += 1
        return CheckPass(self, progress, shape)

    def unchanged(self, summary):
        return self._current_stamp() == self._stamp and summary.same_content(self.first_summary)


def verify_file(path, reporter, decrypted=None):
    """Check the archive at ``path`` completely, SQLite databases inside included.

    Gives an ArchiveSummary whose ``databases`` hold one result for each
    database (a damaged one is for the caller to judge). Raises ArchiveError
    (with the rule) for a damaged archive, BackupError when it cannot be read.
    ``decrypted(path)``, for an encrypted file, is a context manager giving
    the archive inside as a stream; the checksum is then the encrypted file's.
    """
    try:
        with open(path, "rb") as file, \
                DatabaseCheck(os.path.dirname(os.path.abspath(path))) as databases:
            hashing = _HashingReader(file)
            with reporter.progress("Checking %s" % os.path.basename(path),
                                   total=os.fstat(file.fileno()).st_size) as progress:
                if decrypted is None:
                    summary = scan_archive(hashing, progress, databases)
                else:
                    for _ in iter(lambda: hashing.read(READ_SIZE), b""):
                        pass
                    with decrypted(path) as plain:
                        summary = scan_archive(plain, progress, databases)
            summary.databases = databases.results()
    except OSError as error:
        raise BackupError("cannot read %s: %s" % (path, describe_os_error(error)))
    summary.checksum = check_checksum(path, hashing.digest.hexdigest())
    return summary


class _HashingReader:
    def __init__(self, file):
        self.file = file
        self.digest = hashlib.sha256()

    def read(self, size):
        data = self.file.read(size)
        self.digest.update(data)
        return data


def check_checksum(path, digest):
    """Compare with ``<archive>.sha256`` if there is one: give "ok", or None when absent.

    Raises ArchiveError [checksum] when it names another hash or another file.
    """
    try:
        with open(path + CHECKSUM_SUFFIX) as file:
            words = file.read().split()
    except FileNotFoundError:
        return None
    except OSError as error:
        raise BackupError("cannot read %s%s: %s" % (path, CHECKSUM_SUFFIX,
                                                   describe_os_error(error)))
    if words[:2] != [digest, os.path.basename(path)]:
        raise ArchiveError("the archive does not match its checksum file %s%s"
                           % (path, CHECKSUM_SUFFIX), "checksum")
    return "ok"
