"""Skip-if-unchanged: a volume that did not change is published as a hard link to its
newest archive.

listing (the helper, before its tar) → the newest archive's record → same: link | else: tar + record

The listing is one ``stat`` line per entry (inode, links, size, mode, owner,
mtime, ctime, type, name and link target), so any write to a file changes
its line: ctime cannot be set back. Only its SHA-256 is kept, in
``<archive>.listing`` (0600) beside the archive, with what identifies the
archive file as it was written (inode, size, mtime) and its checksum. A
record that is missing, unreadable or of another format means "changed";
so does an archive file that is no longer what the record says (its inode,
size, mtime, ``.sha256`` and, read once more, its SHA-256), or a listing
taken while entries were changing (an entry whose ctime or mtime is not
older than the second the listing began: a second write in that same second
would not show). The linked name gets its own ``.sha256`` (the file names
the archive) and its own record.
"""

import contextlib
import errno
import hashlib
import json
import os
import tempfile

from .errors import ArchiveExists, BackupError, describe_os_error
from .files import CHECKSUM_SUFFIX, LISTING_SUFFIX, TEMP_SUFFIX, WORK_PREFIX, fsync_directory
from .names import archive_name
from .retention import archives_by_source

FORMAT = "ai_stack_backup listing 1"


class Listing:
    """A volume's listing: ``digest`` (SHA-256, hex) and ``problem`` (why it cannot be
    trusted for a later comparison, or None)."""

    def __init__(self, digest, problem=None):
        self.digest, self.problem = digest, problem


def parse_listing(started, text, errors):
    """Give the Listing of what the helper left (see ``transfer.ListedStream``)."""
    if errors.strip():
        return Listing(None, "the listing failed: %s"
                       % errors.decode("utf-8", "replace").strip().splitlines()[-1])
    started = int(started)
    for line in text.splitlines():
        fields = line.split(b" ", 8)
        if len(fields) < 9 or not (fields[6].isdigit() and fields[7].isdigit()):
            continue  # the rest of a name with a newline in it
        if int(fields[6]) >= started or int(fields[7]) >= started:
            return Listing(hashlib.sha256(text).hexdigest(),
                           "entries changed while the volume was listed")
    return Listing(hashlib.sha256(text).hexdigest())


def _archive_identity(status):
    return [status.st_ino, status.st_size, status.st_mtime_ns]


def _read_record(path):
    try:
        with open(path + LISTING_SUFFIX) as file:
            record = json.load(file)
        if record.get("format") != FORMAT:
            return None
        record["listing"], record["archive"], record["sha256"], record["members"]
        return record
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _checksum_of(path):
    try:
        with open(path + CHECKSUM_SUFFIX) as file:
            words = file.read().split()
    except OSError:
        return None
    return words[0] if len(words) == 2 and words[1] == os.path.basename(path) else None


def _hash_file(path):
    """Give the SHA-256 of the file at ``path`` (None if it cannot be read): the one read of
    an unchanged backup, so that nothing links to an archive damaged since it was written."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as file:
            for piece in iter(lambda: file.read(1 << 20), b""):
                digest.update(piece)
    except OSError:
        return None
    return digest.hexdigest()


def _publish_small(path, text):
    """Publish a small file (0600) the way archives are: temp, fsync, link, never overwrite."""
    folder = os.path.dirname(path)
    descriptor, temp = tempfile.mkstemp(prefix=WORK_PREFIX, suffix=TEMP_SUFFIX, dir=folder)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.link(temp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def record(archive_path, listing, members, reporter):
    """Write ``<archive>.listing`` for a newly written archive; a failure is only logged
    (the next backup of the source is then a full one)."""
    if listing is None or listing.problem is not None:
        if listing is not None:
            reporter.log("%s: %s; the next backup will not be skipped"
                         % (archive_path, listing.problem))
        return
    digest = _checksum_of(archive_path)
    if digest is None:
        return  # without a checksum nothing could later prove the archive unchanged
    try:
        text = json.dumps({"format": FORMAT, "listing": listing.digest,
                           "archive": _archive_identity(os.stat(archive_path)),
                           "sha256": digest, "members": members})
        _publish_small(archive_path + LISTING_SUFFIX, text + "\n")
    except OSError as error:
        reporter.warn("cannot write %s%s: %s; the next backup will not be skipped"
                      % (archive_path, LISTING_SUFFIX, describe_os_error(error)))


class Linked:
    """An unchanged volume's new archive: ``path``, a hard link to ``target``."""

    def __init__(self, path, target, size, members):
        self.path, self.target, self.size, self.members = path, target, size, members


def link_if_unchanged(folder, source, timestamp, listing, reporter):
    """Publish ``<source>__<timestamp>.tar.gz`` as a hard link to the newest archive of
    ``source`` if the volume is as it was then; give a Linked, or None (back it up).

    Raises ArchiveExists when the new name is taken.
    """
    if listing is None or listing.digest is None:
        return None
    found = archives_by_source(folder, {source})
    if not found:
        return None
    newest = found[source][0][1]
    saved = _read_record(newest)
    if saved is None or saved["listing"] != listing.digest:
        return None
    try:
        status = os.stat(newest)
    except OSError:
        return None
    if saved["archive"] != _archive_identity(status) or _checksum_of(newest) != saved["sha256"] \
            or _hash_file(newest) != saved["sha256"]:
        reporter.log("%s is not the file it was when written; backing up %s in full"
                     % (newest, source))
        return None
    path = os.path.join(folder, archive_name(source, timestamp))
    try:
        os.link(newest, path)
    except FileExistsError:
        raise ArchiveExists("%s already exists; not overwriting it" % path)
    except OSError as error:
        if error.errno in (errno.EMLINK, errno.EXDEV, errno.EPERM, errno.EOPNOTSUPP,
                           errno.ENOSYS):
            reporter.log("cannot hard-link %s (%s); backing up %s in full"
                         % (newest, describe_os_error(error), source))
            return None
        raise BackupError("cannot publish %s: %s" % (path, describe_os_error(error)))
    try:
        _publish_small(path + CHECKSUM_SUFFIX, "%s  %s\n" % (saved["sha256"],
                                                              os.path.basename(path)))
        saved["archive"] = _archive_identity(os.stat(path))
        _publish_small(path + LISTING_SUFFIX, json.dumps(saved) + "\n")
        fsync_directory(folder)
    except OSError as error:
        for leftover in (path + LISTING_SUFFIX, path + CHECKSUM_SUFFIX, path):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(leftover)
        reporter.log("cannot write the files beside %s (%s); backing up %s in full"
                     % (path, describe_os_error(error), source))
        return None
    return Linked(path, newest, status.st_size, saved["members"])
