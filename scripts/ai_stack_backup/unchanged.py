"""Skip-if-unchanged: a volume that did not change is published as a hard link to its
newest archive.

listing (``blocked``) = the newest archive's record, recipe the same, archive intact? → link

The listing is one ``stat`` line per entry (ctime, inode, links, size, mode,
owner, mtime, name), so any write to a file changes its line: ctime cannot
be set back. Its SHA-256 is kept in the record ``<archive>.listing`` (0600,
written by ``blocked.record``) with what identifies the archive file as it
was written (inode, size, mtime) and its checksum. A record that is
missing, unreadable or of another format means "changed"; so does an
archive file that is no longer what the record says (its inode, size,
mtime, ``.sha256`` and, read once more, its SHA-256). A listing with an
entry whose ctime is not older than the second the helper began is never
recorded: that entry changed while the listing ran, or in the same second,
where a second write would not show. The linked name gets its own
``.sha256`` (the file names the archive) and its own record.

The listing says what the volume held; the record's ``recipe`` says what
else decided the archive's content: the exclusions, the consistency mode,
which databases were snapshotted and this tool's archive format. A record
whose recipe differs means "changed", so an exclusion added to keep a secret
out (or removed to get data back) takes effect the very next night.
"""

import contextlib
import errno
import hashlib
import json
import os

from .errors import ArchiveExists, BackupError, describe_os_error
from .files import CHECKSUM_SUFFIX, LISTING_SUFFIX, file_sha256, fsync_directory, publish_text
from .names import archive_name

FORMAT = "ai_stack_backup listing 1"
# What our archives are made of; a change means "changed".
ARCHIVE_FORMAT = "ustar+gnu blocked gzip 2"


def recipe(exclusions, capture):
    """Give the digest of what decides an archive's content besides the listing: the
    exclusion patterns, the consistency mode and the snapshotted databases (``capture``)."""
    snapshots = sorted(path.decode("utf-8", "backslashreplace") if isinstance(path, bytes)
                       else str(path) for path in capture.snapshots)
    return hashlib.sha256(json.dumps({
        "format": ARCHIVE_FORMAT, "exclude": list(exclusions.patterns),
        "consistency": capture.mode, "snapshots": snapshots},
        sort_keys=True).encode()).hexdigest()


def archive_identity(status):
    """Give what identifies an archive file as it was written: inode, size, mtime."""
    return [status.st_ino, status.st_size, status.st_mtime_ns]


def read_record(path):
    """Give the record beside the archive at ``path`` (a dict), or None if it is missing,
    unreadable or of another format."""
    try:
        with open(path + LISTING_SUFFIX) as file:
            record = json.load(file)
        if record.get("format") != FORMAT:
            return None
        record["listing"], record["archive"], record["sha256"], record["members"]
        return record
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def checksum_of(path):
    """Give the SHA-256 the archive's ``.sha256`` names for it, or None."""
    try:
        with open(path + CHECKSUM_SUFFIX) as file:
            words = file.read().split()
    except OSError:
        return None
    return words[0] if len(words) == 2 and words[1] == os.path.basename(path) else None


def archive_intact(path, saved):
    """Say whether the archive at ``path`` still has the SHA-256 its record ``saved`` names
    (read once more: nothing links to an archive damaged since it was written)."""
    try:
        if archive_identity(os.stat(path)) != saved["archive"]:
            return False
    except OSError:
        return False
    return checksum_of(path) == saved["sha256"] and _hash_file(path) == saved["sha256"]


def _hash_file(path):
    """Give the SHA-256 of the file at ``path`` (None if it cannot be read): the one read of
    an unchanged backup, so that nothing links to an archive damaged since it was written."""
    try:
        return file_sha256(path)
    except OSError:
        return None


class Linked:
    """An unchanged volume's new archive: ``path``, a hard link to ``target``."""

    def __init__(self, path, target, size, members):
        self.path, self.target, self.size, self.members = path, target, size, members


def link(folder, source, timestamp, unchanged, reporter):
    """Publish ``<source>__<timestamp>.tar.gz`` as a hard link to ``unchanged``, the newest
    archive's ``(path, record)``; give a Linked, or None where no link can be made (the log
    says why).

    Raises ArchiveExists when the new name is taken.
    """
    newest, saved = unchanged
    path = os.path.join(folder, archive_name(source, timestamp))
    try:
        os.link(newest, path)
    except FileExistsError:
        raise ArchiveExists("%s already exists; not overwriting it" % path)
    except OSError as error:
        if error.errno in (errno.EMLINK, errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP,
                           errno.ENOSYS):
            reporter.log("cannot hard-link %s (%s); writing a new archive of %s from it"
                         % (newest, describe_os_error(error), source))
            return None
        raise BackupError("cannot publish %s: %s" % (path, describe_os_error(error)))
    try:
        publish_text(path + CHECKSUM_SUFFIX, "%s  %s\n" % (saved["sha256"],
                                                           os.path.basename(path)))
        # The link left the archive's inode, size and mtime as they were: the record holds.
        publish_text(path + LISTING_SUFFIX, json.dumps(saved) + "\n")
        fsync_directory(folder)
    except (BackupError, OSError) as error:  # OSError: the folder's fsync
        for leftover in (path + LISTING_SUFFIX, path + CHECKSUM_SUFFIX, path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        cause = describe_os_error(error) if isinstance(error, OSError) else str(error)
        reporter.log("cannot write the files beside %s (%s); writing a new archive of %s"
                     % (path, cause, source))
        return None
    return Linked(path, newest, os.stat(path).st_size, saved["members"])
