"""The backup pipeline and the restore pipeline, written once for every kind of source.

backup:  check → prepare → status → captured(planned → listing → [unchanged: link]
                                   | copy from the newest archive ‖ tar the rest → gzip → file)
restore: check → prepare → status → archive | stdin spool → staged (one checked pass) → apply

A source (``volume.VolumeSource``, ``hostpath.PathSource``) supplies only what
differs: ``kind``, ``name``, ``archive_source``, ``check()``,
``prepare(reporter)``, ``captured(reporter, work_folder)`` (a context manager
giving an object whose ``describe()`` says how the copy was made consistent),
``planned(reporter, work_folder)`` (a context manager giving a
``transfer.PlannedStream`` or its like), ``listing(planned, previous, held)`` (the
``blocked.Listing``, once complete, with the plan made from it as it was
written, if any), ``write_planned(output, config,
progress, reporter, planned, listing, previous, held, exclude)`` and
``write_tar(output, progress, reporter, work_folder, exclude, held, listed)``, which
are handed the capture (state travels as arguments, never parked on the
source between calls). A restore target
(``volume.VolumeTarget``, ``hostpath.PathTarget``) supplies ``kind``,
``name``, ``description``, ``check(archive_path)``, ``prepare(reporter)``,
``reads_once`` (after ``prepare``: stdin is read as it comes, not kept first),
``staged(archive, work_folder, progress, reporter)`` — a context manager that reads
and checks the whole archive once, raising ArchiveError before anything
changed (a volume with nothing to lose is checked in ``apply``'s one pass
instead) — and ``apply(staged, archive, reporter, save_copy)``, which makes the
change (taking its safety copy with ``save_copy(source, reuse_from)``, the
archive's path as ``reuse_from``, and rolling back itself on failure) and
gives a ``Restored``: the status lines for after ``OK``, and how to undo
the change later (restore_all, when a later source fails).
"""

import contextlib
import os
import sys
import threading
import time

from . import blocked, unchanged
from .archive import ArchiveInput
from .capture import Capture
from .errors import ArchiveError, ArchiveExists, ArchiveRefused, BackupError, NotFound, \
    describe_os_error
from .files import AtomicArchive, ensure_backup_dir, private_work_folder, spooled
from .catalog import newest_archive
from .gzipstream import ParallelGzipWriter
from .names import archive_name, utc_timestamp


class BackupResult:
    """What one backup produced: source name (as in the archive name), path (``-``: stdout),
    size (None on stdout), members, seconds, and how it was made consistent (``consistency``
    in words; ``capture``: the source's capture, with ``mode`` and ``pause``)."""

    def __init__(self, source, path, size, members, seconds, consistency=""):
        self.source, self.path, self.size, self.members, self.seconds = \
            source, path, size, members, seconds
        self.consistency = consistency
        self.capture = None
        self.linked_to = None  # skip-if-unchanged: the archive this one is a hard link to


class Restored:
    """What a restore did: ``closing``, the status lines for after ``OK``; ``undo(reporter)``,
    which puts the target back as it was and gives a sentence saying so (None: it cannot
    be undone, as no safety copy was taken)."""

    def __init__(self, closing, undo):
        self.closing, self.undo = closing, undo


def _write_gzip_tar(source, output, config, reporter, work_folder=None, exclude=(), held=None,
                    listed=None):
    """Let ``source`` write its tar stream through the parallel gzip into ``output``.

    ``held`` (the source's capture) and ``listed`` (a planned stream told to tar it all)
    go to ``write_tar``. Gives the member count. The gzip stream is finished only on
    success, so a failed stream never looks complete.
    """
    gzip_writer = ParallelGzipWriter(output, config.gzip_level, config.threads)
    try:
        with reporter.progress("Backing up %s" % source.name) as progress:
            members = source.write_tar(gzip_writer, progress, reporter, work_folder, exclude,
                                       held, listed)
        gzip_writer.close()
    except BaseException:
        gzip_writer.abort()
        raise
    return members


def write_archive(source, folder, produce, reporter, timestamp, link_identical=False):
    """Write ``folder/<source>__<timestamp>.tar.gz`` atomically; give a BackupResult.

    No status lines: ``backup`` frames this. ``produce(output, exclude)`` writes
    the gzip stream (never archiving the files ``exclude`` names, the archive
    itself) and gives the member count. With ``link_identical`` (skip-if-unchanged), an
    archive that is byte for byte the one it was copied from is a hard link to it
    (``linked_to``). Raises ArchiveExists when the name is taken, BackupError otherwise.
    """
    started = time.monotonic()
    path = os.path.join(folder, archive_name(source.archive_source, timestamp))
    with AtomicArchive(path) as archive:
        try:
            members = produce(archive.output, {archive.identity()})
        except OSError as error:
            raise BackupError("cannot write %s: %s" % (path, describe_os_error(error)))
        size = archive.publish(checksum=True, link_identical=link_identical)
        if archive.linked:
            reporter.log("%s %s: its archive is byte for byte %s, so it is published as a "
                         "hard link to it" % (source.kind, source.name, archive.linked))
        if archive.checksum_problem:
            reporter.warn(archive.checksum_problem)
    result = BackupResult(source.archive_source, path, size, members,
                          time.monotonic() - started)
    result.linked_to = archive.linked
    return result


def work_folder_for(config, reporter, given=None):
    """The private work folder of a command (``files.private_work_folder``): BACKUP_DIR when
    it was set (created if missing: it was given), else the folder the command writes to
    (``given``, a backup's destination), else the default backup folder if it exists. No
    folder the command was not given is ever created."""
    if config.backup_dir_configured or given is None:
        return private_work_folder(config.backup_dir, reporter,
                                   create=config.backup_dir_configured)
    return private_work_folder(given, reporter, create=False)


def _copy_saver(config, reporter, work_folder):
    """Give ``save_copy(source, reuse_from=None)``: a quiet backup of a target's current
    contents (the safety copy), as it is (consistency live: the caller holds the lock).

    The copy goes to the private work folder, built like any backup from the
    newest archive of the source there, else from ``reuse_from`` (the archive
    being restored: what is on the target is often much of it); unchanged
    since that archive, it is a hard link to it. One taken in the same second
    as another archive of that source would get its name; it then takes the
    next second.
    """
    def save_copy(source, reuse_from=None):
        held = Capture("live", "live")
        try:
            return _write_planned(source, work_folder, config, reporter.silent(), work_folder,
                                  None, held, True, reuse_from)
        except ArchiveExists:
            time.sleep(1.05 - time.time() % 1)
            return _write_planned(source, work_folder, config, reporter.silent(), work_folder,
                                  None, held, True, reuse_from)
    return save_copy


def backup(source, destination, config, reporter, stdout=None, skip_unchanged=False):
    """Back up ``source`` into the folder ``destination``, or to stdout for ``-``.

    Shows the old scripts' three lines (``Backing up volume: …``, ``Output:
    …``, ``OK``), on stderr when stdout carries the archive. With
    ``skip_unchanged``, a source whose listing matches its newest archive's
    gets a hard link to that archive instead (``linked_to``). Gives a
    BackupResult; raises BackupError with nothing published.
    """
    source.check()
    source.prepare(reporter)  # nothing is created, not even the folder, before this passed
    to_stdout = destination == "-"
    if to_stdout:
        reporter = reporter.status_to_log()
        path = "-"
    else:
        folder = ensure_backup_dir(destination)
        timestamp = utc_timestamp()
        path = os.path.join(folder, archive_name(source.archive_source, timestamp))
    work_folder = work_folder_for(config, reporter, None if to_stdout else folder) \
        if source.uses_work_folder else None
    reporter.status("Backing up %s: %s" % (source.kind, source.name))
    reporter.status("Output: %s" % path)
    with source.captured(reporter, work_folder) as capture:
        if to_stdout:
            started = time.monotonic()
            output = stdout or sys.stdout.buffer
            try:
                members = _write_gzip_tar(source, output, config, reporter, held=capture)
                output.flush()
            except BrokenPipeError:
                raise BackupError("backing up %s %s failed: stdout was closed"
                                  % (source.kind, source.name))
            result = BackupResult(source.archive_source, "-", None, members,
                                  time.monotonic() - started)
        else:
            result = _write_planned(source, folder, config, reporter, work_folder, timestamp,
                                    capture, skip_unchanged)
    result.consistency = capture.describe()
    result.capture = capture
    reporter.status("OK")
    return result


def _write_planned(source, folder, config, reporter, work_folder, timestamp, held,
                   skip_unchanged, reuse_from=None):
    """Back up ``source`` from its listing (``blocked``): what its newest archive's record
    proves unchanged is copied from that archive (none in ``folder``: from ``reuse_from``,
    if given), the rest is read. With ``skip_unchanged``, a source whose whole listing and
    recipe (``unchanged.recipe``) match that record gets a hard link to that archive
    instead."""
    started = time.monotonic()
    timestamp = timestamp or utc_timestamp()  # a safety copy's: a link needs one too
    made_by = unchanged.recipe(source.exclusions, held)
    newest = newest_archive(folder, source.archive_source) or reuse_from
    saved = unchanged.read_record(newest) if newest else None
    previous = blocked.open_previous(newest, saved, made_by) if saved is not None else None
    if isinstance(previous, str):
        reporter.log("%s; reading all of %s %s" % (previous, source.kind, source.name))
        previous = None
    # Its members are read and checked while the helper starts and lists.
    checked = _Checked(previous) if previous is not None else None
    # Unless the whole listing decides on a link first, the source is written while it is
    # listed where it can be.
    while_listing = not (skip_unchanged and saved is not None) and \
        source.writes_while_listing(previous, held)
    try:
        with source.planned(reporter, work_folder) as planned:
            if while_listing:
                problem = checked.problem() if checked is not None else None
                if problem is not None:
                    reporter.log("%s; backing up %s %s in full" % (problem, source.kind,
                                                                   source.name))
                    previous = None
                result, listing, blocks = _write_while_listing(source, folder, config, reporter,
                                                               timestamp, planned, previous)
                if listing.racy and skip_unchanged:
                    reporter.log(_RACY % (source.kind, source.name, source.kind))
                return _recorded(result, listing, made_by, blocks, reporter)
            listing = source.listing(planned, previous, held)
            if listing.problem is not None:
                reporter.log("%s %s: %s; reading all of it" % (source.kind, source.name,
                                                              listing.problem))
            elif listing.racy and skip_unchanged:
                reporter.log(_RACY % (source.kind, source.name, source.kind))
            if skip_unchanged and saved is not None:
                result = _linked_if_unchanged(source, folder, timestamp, listing,
                                              (newest, saved), made_by, reporter)
                if result is not None:
                    planned.send("stop")
                    result.seconds = time.monotonic() - started
                    return result
            problem = checked.problem() if checked is not None else None
            if problem is not None or listing.problem is not None:
                if problem is not None:
                    reporter.log("%s; backing up %s %s in full" % (problem, source.kind,
                                                                   source.name))
                previous = None
            made = []

            def produce(output, exclude):
                if listing.problem is not None:  # the whole source, as one tar
                    planned.send("full")
                    made.append(None)
                    return _write_gzip_tar(source, output, config, reporter, work_folder,
                                           exclude, held, planned)
                with reporter.progress("Backing up %s" % source.name) as progress:
                    members, blocks = source.write_planned(output, config, progress, reporter,
                                                           planned, listing, previous, held,
                                                           exclude)
                made.append(blocks)
                return members
            result = write_archive(source, folder, produce, reporter, timestamp,
                                   skip_unchanged)
    finally:
        if checked is not None:
            checked.finish()
    return _recorded(result, listing, made_by, made[0], reporter)


_RACY = "%s %s: entries changed while the %s was listed; the next backup will not be skipped"


def _write_while_listing(source, folder, config, reporter, timestamp, planned, previous):
    """Publish an archive of ``source`` written while it is listed, copying from
    ``previous`` what it can; give ``(BackupResult, Listing, the record's blocks)``."""
    made = []

    def produce(output, exclude):
        with reporter.progress("Backing up %s" % source.name) as progress:
            members, blocks, listing = source.write_while_listing(
                output, config, progress, reporter, planned, previous, exclude)
        made.extend((blocks, listing))
        return members
    result = write_archive(source, folder, produce, reporter, timestamp)
    blocks, listing = made
    if listing.problem is not None:
        reporter.log("%s %s: %s; the next backup reads all of it again"
                     % (source.kind, source.name, listing.problem))
    return result, listing, blocks


def _recorded(result, listing, made_by, blocks, reporter):
    """Write the record of the archive just published (``blocked.record``); give ``result``."""
    blocked.record(result.path, listing, result.members, made_by, blocks, reporter)
    return result


class _Checked(threading.Thread):
    """Reads and checks every member of a ``blocked.Previous`` in the background; owns it."""

    def __init__(self, previous):
        super().__init__(name="previous-archive", daemon=True)
        self.previous = previous
        self._problem = None
        self.start()

    def run(self):
        try:
            self.previous.check()
        except ArchiveError as error:
            self._problem = str(error)

    def problem(self):
        """Wait for the check; give what did not match, or None."""
        self.join()
        return self._problem

    def finish(self):
        self.join()
        self.previous.close()


def _linked_if_unchanged(source, folder, timestamp, listing, newest, made_by, reporter):
    """Give the BackupResult of a hard link to the newest archive (``(path, record)``) if the
    whole listing and the recipe are those of its record and it is intact; else None."""
    path, saved = newest
    if listing.digest is None or listing.racy or saved["listing"] != listing.digest or \
            saved.get("recipe") != made_by:
        return None
    if not unchanged.archive_intact(path, saved):
        reporter.log("%s is not the file it was when written; backing up %s in full"
                     % (path, source.name))
        return None
    linked = unchanged.link(folder, source.archive_source, timestamp, newest, reporter)
    if linked is None:
        return None
    result = BackupResult(source.archive_source, linked.path, linked.size, linked.members, 0)
    result.linked_to = linked.target
    reporter.log("%s %s is unchanged since %s: published as a hard link to it"
                 % (source.kind, source.name, linked.target))
    return result


@contextlib.contextmanager
def _opened_archive(archive_path, work_folder, stdin, once):
    if archive_path != "-":
        with open(archive_path, "rb") as file:
            yield ArchiveInput(file, archive_path)
        return
    if once:  # a target with nothing to lose reads it in one pass, as it comes
        yield ArchiveInput(stdin or sys.stdin.buffer, "-")
        return
    # It must be read completely before anything changes, and may be read again.
    with spooled(stdin or sys.stdin.buffer, work_folder) as file:
        yield ArchiveInput(file, "-")


def restore(target, archive_path, config, reporter, stdin=None):
    """Make ``target`` exactly what the archive holds (``-``: read it from stdin).

    Nothing changes until the whole archive checked out: a damaged or hostile
    archive raises ArchiveRefused naming the rule. Shows ``Restoring …``,
    ``From: …``, ``OK`` and the target's closing lines; gives its ``Restored``.
    """
    if archive_path != "-" and not os.path.isfile(archive_path):
        raise NotFound("archive not found: %s" % archive_path)
    target.check(archive_path)
    target.prepare(reporter)
    reporter.status("Restoring %s: %s" % (target.kind, target.name))
    reporter.status("From: %s" % archive_path)
    work_folder = work_folder_for(config, reporter)
    with _opened_archive(archive_path, work_folder, stdin, target.reads_once) as archive, \
            contextlib.ExitStack() as stack:
        with reporter.progress("Checking archive", total=archive.size) as progress:
            try:
                staged = stack.enter_context(target.staged(archive, work_folder, progress,
                                                                reporter))
            except ArchiveError as error:
                raise ArchiveRefused("the archive %s is refused [%s]: %s; %s was not changed"
                                     % (archive_path, error.rule, error, target.description),
                                     error.rule)
        restored = target.apply(staged, archive, reporter,
                                _copy_saver(config, reporter, work_folder))
    reporter.status("OK")
    for line in restored.closing:
        reporter.status(line)
    return restored
