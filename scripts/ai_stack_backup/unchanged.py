"""Skip-if-unchanged: a volume that did not change is published as a hard link to its
newest archive.

helper: tar ‖ listing → Decision (a thread): listing = the newest archive's record?
  yes: stop the helper, the tar stream ends → link   no: the tar becomes an archive + record

The listing is one ``stat`` line per entry (inode, links, size, mode, owner,
mtime, ctime, type, name and link target), so any write to a file changes
its line: ctime cannot be set back. It runs beside the tar, so a changed
volume pays little for it. Only its SHA-256 is kept, in
``<archive>.listing`` (0600) beside the archive, with what identifies the
archive file as it was written (inode, size, mtime) and its checksum. A
record that is missing, unreadable or of another format means "changed";
so does an archive file that is no longer what the record says (its inode,
size, mtime, ``.sha256`` and, read once more, its SHA-256). A listing with an
entry whose ctime is not older than the second the helper began is never
recorded: that entry changed while the tar and the listing ran, or in the
same second, where a second write would not show. The linked name gets
its own ``.sha256`` (the file names the archive) and its own record.

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
import threading
import time

from .errors import ArchiveExists, BackupError, describe_os_error
from .files import CHECKSUM_SUFFIX, LISTING_SUFFIX, file_sha256, fsync_directory, publish_text
from .names import archive_name
from .catalog import newest_archive

FORMAT = "ai_stack_backup listing 1"
ARCHIVE_FORMAT = "ustar+pax gzip 1"  # what our archives are made of; a change means "changed"


class Listing:
    """A volume's listing: ``digest`` (SHA-256, hex) and ``problem`` (why it cannot be
    trusted for a later comparison, or None)."""

    def __init__(self, digest, problem=None):
        self.digest, self.problem = digest, problem


CLOCK_MARGIN = 5  # seconds past the parse that still count as "now" (a clock stepped back)


def _prefixes(low, high):
    """Give decimal prefixes that together match exactly the numbers ``low`` to ``high``."""
    found = []
    while low <= high:
        size = 1
        while low % (size * 10) == 0 and low + size * 10 - 1 <= high:
            size *= 10
        found.append(str(low // size).encode() if size > 1 else str(low).encode())
        low += size
    return found


def parse_listing(started, text, errors, now=None):
    """Give the Listing of what the helper left (see ``transfer.ListedStream``).

    Racy: some line starts with a ctime from ``started`` (the helper's second when it
    began) to now. Only a write in that window can be missing from the listing, and
    every write sets the ctime to the time of the write, so older or future-dated
    mtimes do not matter. The search is a handful of substring searches, not a parse.
    """
    if errors.strip():
        return Listing(None, "the listing failed: %s"
                       % errors.decode("utf-8", "replace").strip().splitlines()[-1])
    started = int(started)
    newest = int(time.time() if now is None else now) + CLOCK_MARGIN
    digest = hashlib.sha256(text).hexdigest()
    for prefix in _prefixes(started, max(started, newest)):
        # A line starting with these digits: a ctime in the window (or, conservatively,
        # the rest of a name with a newline in it).
        if text.startswith(prefix) or b"\n" + prefix in text:
            return Listing(digest, "entries changed while the volume was backed up")
    return Listing(digest)


def recipe(exclusions, capture):
    """Give the digest of what decides an archive's content besides the listing: the
    exclusion patterns, the consistency mode and the snapshotted databases (``capture``)."""
    snapshots = sorted(path.decode("utf-8", "backslashreplace") if isinstance(path, bytes)
                       else str(path) for path in capture.snapshots)
    return hashlib.sha256(json.dumps({
        "format": ARCHIVE_FORMAT, "exclude": list(exclusions.patterns),
        "consistency": capture.mode, "snapshots": snapshots},
        sort_keys=True).encode()).hexdigest()


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
    try:
        return file_sha256(path)
    except OSError:
        return None


def record(archive_path, listing, members, made_by, reporter):
    """Write ``<archive>.listing`` for a newly written archive made by the ``recipe``
    ``made_by``; a failure is only logged (the next backup of the source is then a full
    one)."""
    if listing is None or listing.problem is not None:
        if listing is not None:
            reporter.log("%s: %s; the next backup will not be skipped"
                         % (archive_path, listing.problem))
        return
    digest = _checksum_of(archive_path)
    if digest is None:
        return  # without a checksum nothing could later prove the archive unchanged
    try:
        identity = _archive_identity(os.stat(archive_path))
    except OSError:
        return
    try:
        publish_text(archive_path + LISTING_SUFFIX, json.dumps({
            "format": FORMAT, "listing": listing.digest, "archive": identity,
            "sha256": digest, "members": members, "recipe": made_by}) + "\n")
    except BackupError as error:
        reporter.warn("%s; the next backup will not be skipped" % error)


class Linked:
    """An unchanged volume's new archive: ``path``, a hard link to ``target``."""

    def __init__(self, path, target, size, members):
        self.path, self.target, self.size, self.members = path, target, size, members


class Decision(threading.Thread):
    """Waits, beside the backup, for the helper's listing and holds it against the newest
    archive's record; if they match, stops the helper so that the backup ends early.

    After ``join()``: ``listing`` (None if there was none), ``unchanged`` (the newest
    archive's path and record, or None), ``stopped`` (the helper was stopped, also when
    the archive's own bytes then did not match: back up again) and ``notes``, lines for
    the log.
    """

    def __init__(self, folder, source, listed, made_by):
        super().__init__(name="skip-if-unchanged", daemon=True)
        self.folder, self.source, self.listed = folder, source, listed
        self.made_by = made_by  # the recipe this backup would make its archive by
        self.listing, self.unchanged, self.notes = None, None, []
        self.stopped = False

    def changed(self):
        """Wait for the decision; say whether the source changed (its archive is needed)."""
        self.join()
        return self.unchanged is None

    def stopped_the_helper(self):
        """Wait for the decision; say whether it stopped the helper on purpose (a backup that
        then failed is no failure)."""
        self.join()
        return self.stopped

    def run(self):
        raw = self.listed.wait_for_listing()
        if raw is None:
            return
        self.listing = parse_listing(*raw)
        if self.listing.digest is None:
            return
        newest = newest_archive(self.folder, self.source)
        if newest is None:
            return
        saved = _read_record(newest)
        if saved is None or saved["listing"] != self.listing.digest:
            return
        if saved.get("recipe") != self.made_by:
            self.notes.append("%s was made with other settings (exclusions, consistency, "
                              "snapshotted databases or format); backing up %s in full"
                              % (newest, self.source))
            return
        try:
            status = os.stat(newest)
        except OSError:
            return
        if saved["archive"] != _archive_identity(status) or \
                _checksum_of(newest) != saved["sha256"]:
            self.notes.append("%s is not the file it was when written; backing up %s in full"
                              % (newest, self.source))
            return
        # Everything says unchanged: stop the tar before the archive's bytes are read again
        # (they only ever fail to match when the disk damaged them).
        self.stopped = True
        self.listed.stop()
        if _hash_file(newest) != saved["sha256"]:
            self.notes.append("%s is not the file it was when written; backing up %s in full"
                              % (newest, self.source))
            return
        self.unchanged = (newest, saved)


def link(folder, source, timestamp, unchanged, reporter):
    """Publish ``<source>__<timestamp>.tar.gz`` as a hard link to the archive of the Decision's
    ``unchanged``; give a Linked, or None where no link can be made (the log says why).

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
            reporter.log("cannot hard-link %s (%s); backing up %s in full"
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
        reporter.log("cannot write the files beside %s (%s); backing up %s in full"
                     % (path, cause, source))
        return None
    return Linked(path, newest, os.stat(path).st_size, saved["members"])
