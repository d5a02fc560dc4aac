"""Whole-archive checks: gzip to the end, tar structure, end marker, safety rules.

Restore, verify_backup and backup_all's read-back all use ``scan_archive``, so
an archive that verifies is exactly an archive that restores.
"""

import contextlib
import fcntl
import os
import sys
import tempfile

from .common import TEMP_SUFFIX, WORK_PREFIX, BackupError, Progress, describe_os_error
from .gzipstream import iter_gunzip, prefetched
from .tarstream import ArchiveRules, TarReader

READ_SIZE = 1 << 20


class ArchiveSummary:
    """What a full check of an archive found."""

    def __init__(self, members, data_bytes, tar_bytes, compressed_bytes):
        self.members = members
        self.data_bytes = data_bytes
        self.tar_bytes = tar_bytes
        self.compressed_bytes = compressed_bytes

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


def scan_archive(file, progress=None):
    """Read a whole gzip tar archive from ``file`` and check everything; give an ArchiveSummary.

    Raises ArchiveError naming the first problem.
    """
    reader, members, counter = checked_members(file, progress)
    for _ in members:
        pass
    return ArchiveSummary(reader.members, reader.data_bytes, reader.offset, counter.count)


def verify_file(path, quiet=True):
    """Check the archive at ``path`` completely; give an ArchiveSummary or raise BackupError."""
    try:
        with open(path, "rb") as file:
            progress = Progress("Checking %s" % os.path.basename(path),
                                total=os.fstat(file.fileno()).st_size, enabled=not quiet)
            try:
                return scan_archive(file, progress)
            finally:
                progress.finish()
    except OSError as error:
        raise BackupError("cannot read %s: %s" % (path, describe_os_error(error)))


@contextlib.contextmanager
def spooled_stdin(folder):
    """Copy stdin into a private temp file in ``folder``; give it opened for reading.

    A restore from stdin must read the whole archive before anything changes,
    and then read it again, so it has to be kept somewhere.
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
            source = sys.stdin.buffer
            try:
                while True:
                    data = source.read(READ_SIZE)
                    if not data:
                        break
                    spool.write(data)
                spool.flush()
            except OSError as error:
                raise BackupError("cannot store the archive from stdin in %s: %s"
                                  % (folder, describe_os_error(error)))
            spool.seek(0)
            yield spool
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

