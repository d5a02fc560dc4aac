"""backup_all: every source, verified, then retention that cannot eat the last good backup.

What the systemd timer runs. One run at a time (a flock in the backup
folder). Every source is tried whatever happens to the others; each new
archive is read back completely before it counts. Retention only ever
deletes our own archives (exact name pattern, top level of the folder), by
the timestamp in the name, never the newest few of a source, and never for a
source whose backup failed in this run.
"""

import fcntl
import os
import re
import sys
import time

from .archive import verify_file
from .common import DEFAULT_BACKUP_DIR, EXIT_LOCKED, LOCK_NAME, BackupError, ensure_backup_dir, \
    human_size, log, parse_archive_name, parse_timestamp, remove_stale_work_files, safe_name, say
from .pathbackup import backup_path
from .volume import backup_volume

DEFAULT_OUTPUT_ROOT = "/home/wasti/ai_stack_data/transcript-miner/output"
DEFAULT_RETENTION_DAYS = 14
DEFAULT_MIN_KEEP = 3
# The runbook's five volumes; the first two keep their old variables.
OTHER_DEFAULT_VOLUMES = ("context6-data", "context6-cache", "qdrant-data")
TRUE_WORDS = ("1", "yes", "true", "on")
FALSE_WORDS = ("", "0", "no", "false", "off")


class LockedError(BackupError):
    """Another run holds the lock; exits 75 so a timer can simply try again."""

    exit_code = EXIT_LOCKED


def _whole_number(environ, name, default, minimum):
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < minimum:
        raise BackupError("%s must be a whole number of at least %d, not %r" % (name, minimum, raw))
    return int(raw)


class Settings:
    """backup_all's configuration, read from the environment as the old script did."""

    def __init__(self, environ=None):
        environ = os.environ if environ is None else environ
        self.backup_dir = environ.get("BACKUP_DIR", "").strip() or DEFAULT_BACKUP_DIR
        self.output_root = environ.get("OUTPUT_ROOT", DEFAULT_OUTPUT_ROOT).strip()
        self.retention_days = _whole_number(environ, "RETENTION_DAYS", DEFAULT_RETENTION_DAYS, 0)
        self.min_keep = _whole_number(environ, "RETENTION_MIN_KEEP", DEFAULT_MIN_KEEP, 1)
        raw_volumes = environ.get("VOLUMES", "").strip()
        if raw_volumes:
            self.volumes = [name for name in re.split(r"[\s,]+", raw_volumes) if name]
        else:
            self.volumes = [environ.get("OPEN_WEBUI_VOLUME", "").strip() or "owui-data",
                            environ.get("TOOL_TM_VOLUME", "").strip() or "tm-data"]
            self.volumes += list(OTHER_DEFAULT_VOLUMES)
        stop = environ.get("STOP_CONTAINERS", "").strip().lower()
        if stop not in TRUE_WORDS + FALSE_WORDS:
            raise BackupError("STOP_CONTAINERS must be 1 or 0, not %r" % stop)
        self.stop_containers = stop in TRUE_WORDS


class BackupLock:
    """An exclusive flock on ``<folder>/.ai_stack_backup-lock`` holding the owner's PID.

    Raises LockedError (exit 75), naming the holder's PID, when another run has it.
    """

    def __init__(self, folder):
        self.path = os.path.join(folder, LOCK_NAME)
        self.descriptor = None

    def __enter__(self):
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(descriptor, 64).decode("ascii", "replace").strip() or "unknown"
            os.close(descriptor)
            raise LockedError("another backup_all run (PID %s) holds the lock %s; not starting"
                              % (holder, self.path))
        os.ftruncate(descriptor, 0)
        os.write(descriptor, b"%d\n" % os.getpid())
        self.descriptor = descriptor
        return self

    def __exit__(self, *exc_info):
        os.ftruncate(self.descriptor, 0)
        os.close(self.descriptor)  # closing releases the flock


class Outcome:
    """How one source went: ``status`` is ok, FAILED or skipped."""

    def __init__(self, kind, name, source, status, archive=None, size=None, seconds=0.0,
                 reason=""):
        self.kind, self.name, self.source, self.status = kind, name, source, status
        self.archive, self.size, self.seconds, self.reason = archive, size, seconds, reason

    def line(self):
        if self.status == "ok":
            detail = "%s, %s, %.1f s" % (self.archive, human_size(self.size), self.seconds)
        else:
            detail = "%s (%.1f s)" % (self.reason, self.seconds)
        return "%-7s %s %s: %s" % (self.status, self.kind, self.name, detail)


def _back_up_and_verify(kind, name, source, backup, messages):
    """Run one backup and read the archive back; give an Outcome (never raises BackupError)."""
    started = time.monotonic()
    try:
        result = backup()
    except BackupError as error:
        log("ERROR: %s" % error)
        return Outcome(kind, name, source, "FAILED", seconds=time.monotonic() - started,
                       reason=str(error))
    try:
        summary = verify_file(result.path)
    except BackupError as error:
        # Keep the bytes for inspection, but not under a name that counts as a backup.
        os.rename(result.path, result.path + ".failed-verification")
        reason = "the new archive failed verification (%s); kept as %s.failed-verification" \
            % (error, result.path)
        log("ERROR: %s" % reason)
        return Outcome(kind, name, source, "FAILED", seconds=time.monotonic() - started,
                       reason=reason)
    say(messages, "Verified: %s (%d members, %s uncompressed)"
        % (result.path, summary.members, human_size(summary.data_bytes)))
    return Outcome(kind, name, source, "ok", result.path, result.size,
                   time.monotonic() - started)


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


def run_backup_all(settings, dry_run=False, messages=None, quiet=True):
    """Back up every source, verify, apply retention; give the list of Outcomes.

    Raises LockedError if another run holds the lock, BackupError if the
    backup folder cannot be prepared. Failures of single sources are in the
    Outcomes, not raised.
    """
    messages = sys.stdout if messages is None else messages
    folder = ensure_backup_dir(settings.backup_dir, enforce_mode=True)
    with BackupLock(folder):
        for path in remove_stale_work_files(folder):
            log("removed %s, left by an earlier run that was killed" % path)
        path_source = safe_name(settings.output_root) if settings.output_root else None
        have_output_root = bool(settings.output_root) and os.path.isdir(settings.output_root)
        if dry_run:
            sources = set(settings.volumes) | ({path_source} if have_output_root else set())
            for volume in settings.volumes:
                say(messages, "would back up volume %s" % volume)
            if have_output_root:
                say(messages, "would back up path %s" % settings.output_root)
            for path in retention_plan(folder, sources, settings.retention_days,
                                       settings.min_keep):
                say(messages, "would delete %s" % path)
            return []
        outcomes = []
        for volume in settings.volumes:
            outcomes.append(_back_up_and_verify(
                "volume", volume, volume,
                lambda volume=volume: backup_volume(volume, folder, settings.stop_containers,
                                                    messages, quiet),
                messages))
        if have_output_root:
            outcomes.append(_back_up_and_verify(
                "path", settings.output_root, path_source,
                lambda: backup_path(settings.output_root, folder, messages, quiet), messages))
        elif settings.output_root:
            say(messages, "WARN: OUTPUT_ROOT not found, skipping: %s" % settings.output_root)
            outcomes.append(Outcome("path", settings.output_root, path_source, "skipped",
                                    reason="not found"))
        succeeded = {outcome.source for outcome in outcomes if outcome.status == "ok"}
        for path in retention_plan(folder, succeeded, settings.retention_days, settings.min_keep):
            log("retention: deleting %s (older than %d days)" % (path, settings.retention_days))
            try:
                os.unlink(path)
            except OSError as error:
                log("ERROR: retention could not delete %s: %s" % (path, error.strerror))
                outcomes.append(Outcome("retention", path, None, "FAILED",
                                        reason="could not delete: %s" % error.strerror))
        for outcome in outcomes:
            say(messages, outcome.line())
        return outcomes
