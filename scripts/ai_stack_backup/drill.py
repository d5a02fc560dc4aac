"""Restore drills: the newest archive of a volume restored into a scratch volume and compared.

newest archive → restore (all of restore's checks) into a fresh scratch volume → read the
scratch volume back → compare both trees member by member (and check its databases) →
scratch volume removed, whatever happened. The real volume is never touched. A path's
archive is drilled the same way into a scratch folder in the work folder. The entries of
both sides go to a private SQLite file, not into memory, and are compared by joins.

A scratch volume is a full copy of an app's data. It carries the label
OWNER_LABEL (the drill's PID) and its host-wide volume lock is held for the
whole drill, so a drill killed outright leaves a volume whose lock is free:
every drill and every backup_all removes such volumes (and says so).
"""

import contextlib
import fcntl
import hashlib
import os
import secrets
import shutil
import sqlite3
import tempfile
import threading
import time

from . import docker, pipeline, transfer
from .archive import ArchiveInput
from .databases import DatabaseCheck
from .catalog import newest_archive
from .errors import ArchiveError, BackupError, Locked, describe_os_error
from .files import READ_SIZE, TEMP_SUFFIX, WORK_PREFIX
from .hostpath import PathTarget
from .hosttree import TreeWriter
from .locks import volume_lock
from .tarstream import FILE, HARDLINK, ArchiveRules, TarReader
from .volume import VolumeTarget

SCRATCH_PREFIX = "ai-stack-backup-drill-"
OWNER_LABEL = "ai-stack-backup.drill-pid"


class DrillResult:
    """How one drill went: ``problem`` is None when the restored tree equals the archive."""

    def __init__(self, volume, archive, members=0, seconds=0.0, problem=None):
        self.volume, self.archive, self.members = volume, archive, members
        self.seconds, self.problem = seconds, problem

    def line(self):
        if self.problem is None:
            return "DRILL ok %s %s %d %.1f" % (self.volume, self.archive, self.members,
                                               self.seconds)
        return "DRILL FAILED %s %s: %s" % (self.volume, self.archive or "-", self.problem)


def _fingerprints(members, data, link_fingerprint, databases=None):
    """Yield ``(path, fingerprint)`` of a tar pass: 16 bytes of BLAKE2 over (kind, mode, uid,
    gid, mtime, size, SHA-256 of the content or the link target).

    A hard link gets the fingerprint ``link_fingerprint(target)`` gives for the file it
    names (link structure follows from busybox's own order, which a restore need not
    reproduce).
    """
    for member in members:
        digest = None
        if member.kind == FILE:
            digest = hashlib.sha256()
            if databases is not None:
                databases.offer(member.path, _digested(data(), digest))
            for piece in data():  # what the database check did not take
                digest.update(piece)
        yield member.path, _fingerprint(member, digest, link_fingerprint)


def _fingerprint(member, digest, link_fingerprint):
    """The fingerprint of ``member``, whose content's SHA-256 is in ``digest`` (a file's)."""
    if member.kind == HARDLINK:
        return link_fingerprint(member.link_path)
    # Numbers first, each followed by a space, the content's digest or the link target last:
    # no two members that differ give the same text.
    return hashlib.blake2b(b"%d %d %d %d %d %d %s" % (
        member.kind, member.mode, member.uid, member.gid, member.mtime, member.size,
        digest.digest() if member.kind == FILE else member.linkname), digest_size=16).digest()


class _ArchiveSide:
    """The archive's side of a ``_Comparison``, taken from the restore's own pass over it
    (``transfer.emit_checked_stream``'s ``seen``), so the archive is inflated once, not
    twice. ``ended``: the whole archive was seen."""

    def __init__(self, comparison):
        self.comparison = comparison
        self.ended = False
        self._member = self._digest = None

    def member(self, member):
        self._take()
        self._member = member
        self._digest = hashlib.sha256() if member.kind == FILE else None

    def piece(self, data):
        self._digest.update(data)

    def close(self):
        self._take()
        self.ended = True

    def _take(self):
        member, self._member = self._member, None
        if member is None:
            return
        self.comparison.expect(member.path, _fingerprint(
            member, self._digest, self.comparison.expected_fingerprint))


def _digested(pieces, digest):
    """Pass ``pieces`` on, adding each to ``digest`` once the taker is back for the next:
    a piece taken but then left (the taker stopped) stays unread and comes again."""
    for piece in pieces:
        yield piece
        digest.update(piece)


class _Comparison:
    """The archive's entries and the restored tree's, each ``(path, fingerprint)``, held in a
    private SQLite file in the work folder rather than in memory: a volume of any size is
    compared in bounded memory. Entries are appended in batches and indexed once, at the
    end, for three joins (a table is indexed earlier only if a hard link asks for a path)."""

    BATCH = 5000
    TABLES = ("archive", "restored")

    def __init__(self, folder):
        try:
            self.descriptor, self.path = tempfile.mkstemp(prefix=WORK_PREFIX + "drill-",
                                                          suffix=TEMP_SUFFIX, dir=folder)
        except OSError as error:
            raise BackupError("cannot create the drill's comparison file in %s: %s"
                              % (folder, describe_os_error(error)))
        fcntl.flock(self.descriptor, fcntl.LOCK_SH)  # no cleanup of killed runs' files takes it
        self.database = sqlite3.connect(self.path, isolation_level=None)
        # Scratch data: no journal, no syncs, a small page cache.
        self.database.executescript(
            "PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF; PRAGMA cache_size=-2048;"
            "CREATE TABLE archive(path BLOB, fingerprint BLOB);"
            "CREATE TABLE restored(path BLOB, fingerprint BLOB); BEGIN")
        self.pending = {table: {} for table in self.TABLES}
        self.indexed = set()
        self.members = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.database.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        os.close(self.descriptor)

    def _put(self, table, path, fingerprint):
        pending = self.pending[table]
        pending[path] = fingerprint or bytes(16)
        if len(pending) >= self.BATCH:
            self._flush(table)

    def _flush(self, table):
        pending = self.pending[table]
        self.database.executemany("INSERT INTO %s VALUES (?, ?)" % table, pending.items())
        pending.clear()

    def _index(self, table):
        if table not in self.indexed:
            self.indexed.add(table)
            self.database.execute("CREATE INDEX %s_path ON %s(path)" % (table, table))

    def _get(self, table, path):
        found = self.pending[table].get(path)
        if found is None:
            self._index(table)
            row = self.database.execute("SELECT fingerprint FROM %s WHERE path = ?" % table,
                                        (path,)).fetchone()
            found = row[0] if row else None
        return found

    def expect(self, path, fingerprint):
        """One entry of the archive."""
        self.members += 1
        self._put("archive", path, fingerprint)

    def expected_fingerprint(self, path):
        """The archive's fingerprint of ``path`` (for a hard link to it), or None."""
        return self._get("archive", path)

    def take(self, path, fingerprint):
        """One entry of the restored tree."""
        self._put("restored", path, fingerprint)

    def fingerprint_of(self, path):
        """The restored fingerprint of a path already seen (for a hard link to it), or None."""
        return self._get("restored", path)

    def difference(self):
        """Say in a few words how the restored tree differs from the archive, or give None."""
        for table in self.TABLES:
            self._flush(table)
            self._index(table)
        words = []
        for label, query in (
                ("missing", "SELECT a.path FROM archive a WHERE NOT EXISTS "
                            "(SELECT 1 FROM restored r WHERE r.path = a.path)"),
                ("not in the archive", "SELECT r.path FROM restored r WHERE NOT EXISTS "
                                       "(SELECT 1 FROM archive a WHERE a.path = r.path)"),
                ("different", "SELECT a.path FROM archive a JOIN restored r "
                              "ON r.path = a.path WHERE r.fingerprint != a.fingerprint")):
            count = self.database.execute("SELECT count(*) FROM (%s)" % query).fetchone()[0]
            if count:
                paths = [row[0] for row in self.database.execute(
                    "%s ORDER BY 1 LIMIT 3" % query)]
                shown = ", ".join(path.decode("utf-8", "replace") or "." for path in paths)
                words.append("%d %s (%s%s)" % (count, label, shown, ", …" if count > 3 else ""))
        return "the restored tree differs: " + "; ".join(words) if words else None


def _read_archive(path, comparison):
    """Put every entry of the archive at ``path`` into the ``comparison``."""
    with open(path, "rb") as file:
        check = ArchiveInput(file, path).check()
        for member_path, fingerprint in _fingerprints(check.members, check.data,
                                                      comparison.expected_fingerprint):
            comparison.expect(member_path, fingerprint)


def _checked(members):
    """Pass the members on, each held to the restore's rules (which also give its path)."""
    rules = ArchiveRules()
    for member in members:
        rules.check(member)
        yield member


def _compare_with_volume(comparison, image, volume, work_folder, databases, reporter):
    """Read the restored volume back into the ``comparison``, and have the helper empty it
    then (it is removed next); give the difference in words, or None."""
    what = "reading back the drill volume %s" % volume
    with transfer.read_back_and_empty(image, volume, work_folder, what) as (descriptor, helper):
        reader = TarReader(transfer.stream_chunks(descriptor))
        for path, fingerprint in _fingerprints(_checked(reader), reader.data,
                                               comparison.fingerprint_of, databases):
            comparison.take(path, fingerprint)
        difference = comparison.difference()  # while the helper empties the volume
        helper.finish(what, reporter)
    return difference


def remove_abandoned_scratch_volumes(image, reporter):
    """Remove the scratch volumes of drills that are gone (their lock is free); say so.
    Never raises: what cannot be looked at or removed is a warning."""
    try:
        found = docker.volumes_labelled(OWNER_LABEL)
    except BackupError as error:
        reporter.warn("could not look for scratch volumes left by killed drills: %s" % error)
        return
    for name, pid in sorted(found.items()):
        if not name.startswith(SCRATCH_PREFIX):
            continue
        try:
            with volume_lock(name):
                transfer.remove_volume(image, name, reporter)
        except Locked:
            continue  # its drill is running
        except BackupError as error:
            reporter.warn("the scratch volume %s of a drill that is gone (PID %s) could not be "
                          "removed: %s" % (name, pid or "unknown", error))
            continue
        reporter.log("removed the scratch volume %s, left by a drill that was killed (PID %s)"
                     % (name, pid or "unknown"))


def drill(volume, config, reporter, archive=None):
    """Restore ``archive`` (default: the newest of ``volume``) into a scratch volume and
    compare; a DrillResult.

    Never raises BackupError: a failure is the result's ``problem``.
    """
    remove_abandoned_scratch_volumes(config.helper_image, reporter)
    if archive is None and os.path.isdir(config.backup_dir):
        archive = newest_archive(config.backup_dir, volume)
    if archive is None:
        return DrillResult(volume, None, problem="no archive of it in %s" % config.backup_dir)
    scratch = SCRATCH_PREFIX + secrets.token_hex(6)
    quiet = reporter.silent()
    started = time.monotonic()
    emptied = False
    try:
        with volume_lock(scratch):
            try:
                result, emptied = _drill_into(scratch, volume, archive, config, quiet, started)
                return result
            finally:
                try:
                    if docker.volume_exists(scratch):
                        transfer.remove_volume(config.helper_image, scratch, quiet, emptied)
                except BackupError as error:
                    reporter.error("the drill volume %s could not be removed: %s; remove it "
                                   "with: docker volume rm %s" % (scratch, error, scratch))
    except BackupError as error:  # the scratch volume's lock
        return DrillResult(volume, archive, problem=str(error))


def _drill_into(scratch, volume, archive, config, quiet, started):
    """Give ``(DrillResult, whether the scratch volume was read back and emptied)``."""
    try:
        work_folder = pipeline.work_folder_for(config, quiet)
        with _Comparison(work_folder) as comparison, DatabaseCheck(work_folder) as databases:
            archive_side = _ArchiveSide(comparison)
            pipeline.restore(VolumeTarget(scratch, config, safety_copy=False,
                                          labels={OWNER_LABEL: str(os.getpid())}, lock_held=True,
                                          seen=archive_side),
                             archive, config, quiet.without_status())
            seconds = time.monotonic() - started
            if not archive_side.ended:  # staged, not streamed (the restore never shows a part)
                _read_archive(archive, comparison)
            difference = _compare_with_volume(comparison, config.helper_image, scratch,
                                              work_folder, databases, quiet)
            damaged = [result.describe() for result in databases.results() if result.problem]
            members = comparison.members
        problem = difference or ("; ".join(damaged) if damaged else None)
        return DrillResult(volume, archive, members, seconds, problem), True
    except (BackupError, ArchiveError) as error:
        return DrillResult(volume, archive, problem=str(error)), False


def drill_path(path, archive, config, reporter):
    """Restore the path archive ``archive`` (of the host path ``path``) into a scratch folder
    in the work folder and compare; a DrillResult (``volume``: the path). The real path is
    never touched; the scratch folder goes, whatever happened."""
    quiet = reporter.silent()
    started = time.monotonic()
    try:
        work_folder = pipeline.work_folder_for(config, quiet)
        scratch = tempfile.mkdtemp(prefix=WORK_PREFIX + "drill-", dir=work_folder)
    except (BackupError, OSError) as error:
        return DrillResult(path, archive, problem="no scratch folder: %s" % error)
    try:
        top = os.path.join(scratch, os.path.basename(path.rstrip("/")))
        pipeline.restore(PathTarget(top, config, safety_copy=False), archive, config,
                         quiet.without_status())
        seconds = time.monotonic() - started
        with _Comparison(work_folder) as comparison, DatabaseCheck(work_folder) as databases:
            _read_archive(archive, comparison)
            difference = _compare_with_tree(comparison, top, databases, quiet)
            damaged = [result.describe() for result in databases.results() if result.problem]
            members = comparison.members
        return DrillResult(path, archive, members, seconds,
                           difference or ("; ".join(damaged) if damaged else None))
    except (BackupError, ArchiveError, OSError) as error:
        return DrillResult(path, archive, problem=str(error))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _compare_with_tree(comparison, top, databases, reporter):
    """Write the restored tree as tar, as a path backup would, into the ``comparison``; give
    the difference in words, or None. A thread writes, this one reads, through a pipe:
    nothing holds the tree."""
    read_end, write_end = os.pipe()
    failures = []

    def write():
        try:
            with os.fdopen(write_end, "wb") as output:
                tree = TreeWriter(output, reporter)
                tree.add_tree(top, os.path.basename(top))
                tree.finish()
        except BrokenPipeError:
            pass  # the reader stopped: its own error says why
        except BaseException as error:  # handed to the reader's thread
            failures.append(error)
    writer = threading.Thread(target=write, name="drill-tree", daemon=True)
    writer.start()
    try:
        with os.fdopen(read_end, "rb") as stream:
            reader = TarReader(iter(lambda: stream.read(READ_SIZE), b""))
            for path, fingerprint in _fingerprints(_checked(reader), reader.data,
                                                   comparison.fingerprint_of, databases):
                comparison.take(path, fingerprint)
    finally:
        writer.join()
    if failures:
        raise failures[0]
    return comparison.difference()
