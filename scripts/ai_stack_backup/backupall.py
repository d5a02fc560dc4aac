"""backup_all: every source, verified, then retention that cannot eat the last good backup.

sources → back up → verify → shrink guard → retention (``retention``) → summary

What the systemd timer runs. One run at a time (a flock in the backup
folder). Every source is tried whatever happens to the others; each new
archive is read back completely before it counts. Retention only ever
deletes our own archives (exact name pattern, top level of the folder), by
the timestamp in the name, never the newest few of a source, and never for a
source whose backup failed in this run or whose new archive is suspiciously
small next to the one before (the shrink guard).
"""

import contextlib
import os
import time

from . import catalog, drill, offsite, pipeline, retention
from .archive import scan_archive, verify_file
from .errors import ArchiveError, BackupError, DatabaseDamaged, NotFound, describe_os_error
from .exclusions import NONE
from .files import LOCK_NAME, SIDECAR_SUFFIXES, ensure_backup_dir, private_work_folder, \
    remove_stale_work_files
from .locks import Lock
from .hostpath import PathSource
from .names import FAILED_SUFFIX
from .report import human_size
from .volume import VolumeSource


def configured_sources(config):
    """Give the sources backup_all backs up: VOLUMES, then OUTPUT_ROOT (if set)."""
    sources = [VolumeSource(volume, config, config.consistency_for(volume),
                            config.exclusions.get(volume, NONE))
               for volume in config.volumes]
    if config.output_root:
        sources.append(PathSource(config.output_root,
                                  config.exclusions.get(config.output_root, NONE)))
    return sources


def retention_policy(config):
    return retention.Policy(config.retention_days, config.min_keep, config.retention_daily,
                            config.retention_weekly, config.retention_monthly,
                            config.retention_hourly)


def backup_all_lock(folder):
    """backup_all's lock: one run at a time per backup folder (exit 75 for the second)."""
    return Lock(folder, LOCK_NAME, "another backup_all run")


class Outcome:
    """How one source went: ``status`` is ok, SUSPICIOUS (backed up, but far smaller than
    before), FAILED or skipped; ``members`` and ``data_bytes`` describe the new archive."""

    FAILURES = ("FAILED", "SUSPICIOUS", "offsite FAILED")

    def __init__(self, kind, name, source, status, archive=None, size=None, seconds=0.0,
                 reason="", consistency="", members=None, data_bytes=None, mode="",
                 pause_seconds=0.0):
        self.kind, self.name, self.source, self.status = kind, name, source, status
        self.archive, self.size, self.seconds, self.reason = archive, size, seconds, reason
        self.consistency, self.members, self.data_bytes = consistency, members, data_bytes
        self.mode, self.pause_seconds = mode, pause_seconds
        self.kept = None  # archives of the source left after retention
        self.offsite = None  # True/False: the off-host copy got through or not; None: none

    @property
    def failed(self):
        return self.status in self.FAILURES

    def line(self):
        if self.status == "ok":
            detail = "%s, %s, %.1f s, %s" % (self.archive, human_size(self.size), self.seconds,
                                            self.consistency)
        else:
            detail = "%s (%.1f s)" % (self.reason, self.seconds)
            if self.status == "offsite FAILED":  # the archive itself is fine, and here
                detail += "; kept: %s" % self.archive
        return "%-7s %s %s: %s" % (self.status, self.kind, self.name, detail)


def _back_up_and_verify(source, folder, config, reporter):
    """Back up one source, read the archive back and hold it against the one before; give an
    Outcome (never raises BackupError)."""
    started = time.monotonic()
    previous = catalog.newest_archive(folder, source.archive_source)

    def failed(reason):
        reporter.error(reason)
        return Outcome(source.kind, source.name, source.archive_source, "FAILED",
                       seconds=time.monotonic() - started, reason=reason)
    try:
        result = pipeline.backup(source, folder, config, reporter,
                                 skip_unchanged=config.skip_unchanged)
    except NotFound:
        # The old script's line for a missing OUTPUT_ROOT; a missing source is no failure.
        reporter.status("WARN: OUTPUT_ROOT not found, skipping: %s" % source.name)
        return Outcome(source.kind, source.name, source.archive_source, "skipped",
                       reason="not found")
    except BackupError as error:
        return failed(str(error))
    if result.linked_to is not None:
        # The very bytes that were read back when they were written, and unchanged since.
        outcome = _good(source, result, "unchanged, linked to %s"
                        % os.path.basename(result.linked_to), result.members)
        return _copied_off_host(outcome, config, reporter, started)
    try:
        summary = verify_file(result.path, reporter.silent())
        damaged = summary.damaged_databases()
        if damaged:
            raise DatabaseDamaged("; ".join(database.describe() for database in damaged))
    except BackupError as error:
        # Keep the bytes for inspection, but not under a name that counts as a backup.
        os.rename(result.path, result.path + FAILED_SUFFIX)
        return failed("the new archive failed verification (%s); kept as %s%s"
                      % (error, result.path, FAILED_SUFFIX))
    for database in summary.databases:
        if not database.checked:
            reporter.warn("%s: %s" % (result.path, database.describe()))
    reporter.status("Verified: %s (%d members, %s uncompressed%s)"
                    % (result.path, summary.members, human_size(summary.data_bytes),
                       _databases_checked(summary)))
    outcome = _good(source, result, result.consistency, summary.members, summary.data_bytes)
    if previous and config.shrink_guard:
        shrunk = _shrunk(summary, result.path, previous, config.shrink_guard, reporter)
        if shrunk:
            outcome.status, outcome.reason = "SUSPICIOUS", shrunk
            reporter.error("%s %s: %s" % (source.kind, source.name, shrunk))
    return _copied_off_host(outcome, config, reporter, started)


def _good(source, result, consistency, members, data_bytes=None):
    """The ``ok`` Outcome of a backup ``result``; the seconds are set when it is done."""
    pause = result.capture.pause
    return Outcome(source.kind, source.name, source.archive_source, "ok", result.path,
                   result.size, consistency=consistency, members=members, data_bytes=data_bytes,
                   mode=result.capture.mode, pause_seconds=pause.seconds if pause else 0.0)


def _copied_off_host(outcome, config, reporter, started):
    """Send the verified archive with OFFSITE_COMMAND, if set; a failure makes the source's
    status ``offsite FAILED``, so nothing of it is pruned and the run exits 1."""
    if config.offsite.command:
        try:
            reporter.log(offsite.send(outcome.archive, outcome.source, config.offsite,
                                      private_work_folder(config.backup_dir, reporter)))
            outcome.offsite = True
        except BackupError as error:
            reporter.error("%s %s: %s; the archive is kept here" % (outcome.kind, outcome.name,
                                                                    error))
            outcome.offsite = False
            if outcome.status == "ok":
                outcome.status, outcome.reason = "offsite FAILED", str(error)
            else:
                outcome.reason += "; and the off-host copy failed: %s" % error
    outcome.seconds = time.monotonic() - started
    return outcome


def _shrunk(summary, path, previous, percent, reporter):
    """Say how the new archive is far smaller than ``previous``, or give "" when it is not.

    Far smaller: its uncompressed bytes or its member count below ``percent``
    percent of the previous archive's. A previous archive that cannot be read
    is no reason to hold the new one back; the log says so.
    """
    try:
        with open(previous, "rb") as file:
            before = scan_archive(file)
    except (ArchiveError, OSError) as error:
        cause = describe_os_error(error) if isinstance(error, OSError) else str(error)
        reporter.warn("shrink guard: cannot read the previous archive %s (%s); not compared"
                      % (previous, cause))
        return ""
    if summary.data_bytes * 100 >= before.data_bytes * percent and \
            summary.members * 100 >= before.members * percent:
        return ""
    return ("the new archive %s holds %d members, %s uncompressed; the previous %s held %d "
            "members, %s (below %d%%: was data wiped?); kept, and nothing of this source is "
            "pruned this run" % (os.path.basename(path), summary.members,
                                 human_size(summary.data_bytes), os.path.basename(previous),
                                 before.members, human_size(before.data_bytes), percent))


def _databases_checked(summary):
    checked = [database for database in summary.databases if database.checked]
    if not checked:
        return ""
    return ", %d SQLite database%s ok" % (len(checked), "" if len(checked) == 1 else "s")


def run_backup_all(config, reporter, dry_run=False, on_start=None):
    """Back up every configured source, verify, apply retention; give the list of Outcomes.

    ``on_start()`` is called once the lock is held. Raises Locked if another
    run holds the lock, BackupError if the backup folder cannot be prepared.
    Failures of single sources are in the Outcomes, not raised.
    """
    folder = ensure_backup_dir(config.backup_dir, enforce_mode=True)
    with backup_all_lock(folder):
        for path in remove_stale_work_files(folder):
            reporter.log("removed %s, left by an earlier run that was killed" % path)
        if not dry_run:
            drill.remove_abandoned_scratch_volumes(config.helper_image, reporter)
        sources = configured_sources(config)
        if dry_run:
            _dry_run(folder, sources, config, reporter)
            return []
        if on_start is not None:
            on_start()
        outcomes = [_back_up_and_verify(source, folder, config, reporter) for source in sources]
        succeeded = {outcome.source for outcome in outcomes if outcome.status == "ok"}
        decisions = retention.plan(folder, succeeded, retention_policy(config))
        doomed = [decision.path for decision in decisions if not decision.kept]
        doomed += retention.failed_copies(folder, {source.archive_source for source in sources},
                                          config.retention_days)
        for path in doomed:
            reporter.log("retention: deleting %s (no rule keeps it)" % path)
            try:
                os.unlink(path)
                for suffix in SIDECAR_SUFFIXES:  # they go with their archive
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(path + suffix)
            except OSError as error:
                reporter.error("retention could not delete %s: %s" % (path, error.strerror))
                outcomes.append(Outcome("retention", path, None, "FAILED",
                                        reason="could not delete: %s" % error.strerror))
        for path in catalog.orphaned_sidecars(folder):
            reporter.log("removing %s: its archive is gone" % path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        left = catalog.archives_by_source(folder)
        for outcome in outcomes:
            if outcome.source is not None:
                outcome.kept = len(left.get(outcome.source, ()))
        for outcome in outcomes:
            reporter.status(outcome.line())
        return outcomes


def _dry_run(folder, sources, config, reporter):
    """Say what a run would back up, and which rule keeps each archive or that none does."""
    present = []
    for source in sources:
        try:
            source.check()
        except NotFound:
            continue
        except BackupError as error:
            reporter.status("would fail %s %s: %s" % (source.kind, source.name, error))
            continue
        present.append(source)
        reporter.status("would back up %s %s" % (source.kind, source.name))
    names = {source.archive_source for source in present}
    for decision in retention.plan(folder, names, retention_policy(config)):
        if decision.kept:
            reporter.status("would keep %s (%s)" % (decision.path, ", ".join(decision.reasons)))
        else:
            reporter.status("would delete %s (no rule keeps it)" % decision.path)
    for path in retention.failed_copies(folder, names, config.retention_days):
        reporter.status("would delete %s (failed verification, older than %d days)"
                        % (path, config.retention_days))
