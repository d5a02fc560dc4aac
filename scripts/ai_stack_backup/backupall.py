"""backup_all: every source, verified, then retention that cannot eat the last good backup.

What the systemd timer runs. One run at a time (a flock in the backup
folder). Every source is tried whatever happens to the others; each new
archive is read back completely before it counts. Retention only ever
deletes our own archives (exact name pattern, top level of the folder), by
the timestamp in the name, never the newest few of a source, and never for a
source whose backup failed in this run.
"""

import contextlib
import os
import time

from . import pipeline
from .archive import verify_file
from .errors import BackupError, DatabaseDamaged, NotFound
from .files import CHECKSUM_SUFFIX, LOCK_NAME, Lock, ensure_backup_dir, remove_stale_work_files
from .hostpath import PathSource
from .names import FAILED_SUFFIX, parse_archive_name, parse_failed_name, parse_timestamp
from .report import human_size
from .volume import VolumeSource


def configured_sources(config):
    """Give the sources backup_all backs up: VOLUMES, then OUTPUT_ROOT (if set)."""
    sources = [VolumeSource(volume, config, config.consistency_for(volume))
               for volume in config.volumes]
    if config.output_root:
        sources.append(PathSource(config.output_root))
    return sources


def BackupLock(folder):
    """backup_all's lock: one run at a time per backup folder (exit 75 for the second)."""
    return Lock(folder, LOCK_NAME, "another backup_all run")


class Outcome:
    """How one source went: ``status`` is ok, FAILED or skipped."""

    def __init__(self, kind, name, source, status, archive=None, size=None, seconds=0.0,
                 reason="", consistency=""):
        self.kind, self.name, self.source, self.status = kind, name, source, status
        self.archive, self.size, self.seconds, self.reason = archive, size, seconds, reason
        self.consistency = consistency

    def line(self):
        if self.status == "ok":
            detail = "%s, %s, %.1f s, %s" % (self.archive, human_size(self.size), self.seconds,
                                            self.consistency)
        else:
            detail = "%s (%.1f s)" % (self.reason, self.seconds)
        return "%-7s %s %s: %s" % (self.status, self.kind, self.name, detail)


def _back_up_and_verify(source, folder, config, reporter):
    """Back up one source and read the archive back; give an Outcome (never raises BackupError)."""
    started = time.monotonic()

    def failed(reason):
        reporter.error(reason)
        return Outcome(source.kind, source.name, source.archive_source, "FAILED",
                       seconds=time.monotonic() - started, reason=reason)
    try:
        result = pipeline.backup(source, folder, config, reporter)
    except NotFound:
        # The old script's line for a missing OUTPUT_ROOT; a missing source is no failure.
        reporter.status("WARN: OUTPUT_ROOT not found, skipping: %s" % source.name)
        return Outcome(source.kind, source.name, source.archive_source, "skipped",
                       reason="not found")
    except BackupError as error:
        return failed(str(error))
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
    return Outcome(source.kind, source.name, source.archive_source, "ok", result.path,
                   result.size, time.monotonic() - started, consistency=result.consistency)


def _databases_checked(summary):
    checked = [database for database in summary.databases if database.checked]
    if not checked:
        return ""
    return ", %d SQLite database%s ok" % (len(checked), "" if len(checked) == 1 else "s")


def retention_plan(folder, sources, retention_days, min_keep, now=None):
    """Give the archive paths retention deletes, oldest first.

    Considered: only regular files directly in ``folder`` whose whole name is
    ``<source>__<YYYYMMDDTHHMMSSZ>.tar.gz`` for a source in ``sources``. Of
    those, an archive goes only if its name's timestamp is more than
    ``retention_days`` old and it is not among the ``min_keep`` newest of its source.
    """
    now = time.time() if now is None else now
    by_source = {}
    for entry in os.scandir(folder):
        parsed = parse_archive_name(entry.name)
        if parsed is None or parsed[0] not in sources or not entry.is_file(follow_symlinks=False):
            continue
        by_source.setdefault(parsed[0], []).append((parse_timestamp(parsed[1]), entry.path))
    doomed = []
    for archives in by_source.values():
        archives.sort(reverse=True)
        doomed += [(when, path) for when, path in archives[min_keep:]
                   if now - when > retention_days * 86400]
    return [path for _, path in sorted(doomed)]


def failed_copies_plan(folder, sources, retention_days, now=None):
    """Give the ``….failed-verification`` copies of ``sources`` older than ``retention_days``.

    They were kept for inspection and never count as backups, so the newest
    few are not kept back; only our exact names directly in ``folder`` qualify.
    """
    now = time.time() if now is None else now
    doomed = []
    for entry in os.scandir(folder):
        parsed = parse_failed_name(entry.name)
        if parsed is None or parsed[0] not in sources or not entry.is_file(follow_symlinks=False):
            continue
        when = parse_timestamp(parsed[1])
        if now - when > retention_days * 86400:
            doomed.append((when, entry.path))
    return [path for _, path in sorted(doomed)]


def orphaned_checksums(folder):
    """Give our ``<archive>.sha256`` files directly in ``folder`` whose archive is gone."""
    orphans = []
    for entry in os.scandir(folder):
        name = entry.name
        if name.endswith(CHECKSUM_SUFFIX) and entry.is_file(follow_symlinks=False) and \
                parse_archive_name(name[:-len(CHECKSUM_SUFFIX)]) is not None and \
                not os.path.lexists(entry.path[:-len(CHECKSUM_SUFFIX)]):
            orphans.append(entry.path)
    return sorted(orphans)


def run_backup_all(config, reporter, dry_run=False):
    """Back up every configured source, verify, apply retention; give the list of Outcomes.

    Raises Locked if another run holds the lock, BackupError if the backup
    folder cannot be prepared. Failures of single sources are in the
    Outcomes, not raised.
    """
    folder = ensure_backup_dir(config.backup_dir, enforce_mode=True)
    with BackupLock(folder):
        for path in remove_stale_work_files(folder):
            reporter.log("removed %s, left by an earlier run that was killed" % path)
        sources = configured_sources(config)
        if dry_run:
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
            for path in retention_plan(folder, names, config.retention_days, config.min_keep) + \
                    failed_copies_plan(folder, names, config.retention_days):
                reporter.status("would delete %s" % path)
            return []
        outcomes = [_back_up_and_verify(source, folder, config, reporter) for source in sources]
        succeeded = {outcome.source for outcome in outcomes if outcome.status == "ok"}
        doomed = retention_plan(folder, succeeded, config.retention_days, config.min_keep)
        doomed += failed_copies_plan(folder, {source.archive_source for source in sources},
                                     config.retention_days)
        for path in doomed:
            reporter.log("retention: deleting %s (older than %d days)"
                         % (path, config.retention_days))
            try:
                os.unlink(path)
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path + CHECKSUM_SUFFIX)  # it goes with its archive
            except OSError as error:
                reporter.error("retention could not delete %s: %s" % (path, error.strerror))
                outcomes.append(Outcome("retention", path, None, "FAILED",
                                        reason="could not delete: %s" % error.strerror))
        for path in orphaned_checksums(folder):
            reporter.log("removing %s: its archive is gone" % path)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for outcome in outcomes:
            reporter.status(outcome.line())
        return outcomes
