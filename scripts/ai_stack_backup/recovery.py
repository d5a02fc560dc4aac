"""The whole stack from one recovery point: restore_all, and the drill of a whole point.

archives (BACKUP_DIR, or fetched copies) → recovery point → plan → locks → every archive
checked (copies decrypted first) → containers stopped → each source restored, the path last →
[a failure: every source restored so far rolled back] → containers started again

A recovery point is one archive per configured source: for the newest time T
at or before ``--at`` such that every source has an archive at or before T,
the newest of each, all within RESTORE_MAX_SPREAD of the newest of them.
Nothing changes until every archive of the set has been read and checked as
verify_backup checks it. Each restore keeps its safety copy, so when a later
source fails, the sources restored before it are put back from theirs. The
host path (OUTPUT_ROOT) goes last: its restore is one rename, so once it is
in, nothing is left that could fail.
"""

import bisect
import contextlib
import os
import time

from . import catalog, docker, drill, offsite, pipeline
from .archive import check_checksum, verify_file
from .backupall import backup_all_lock, configured_sources
from .errors import ArchiveError, BackupError, DatabaseDamaged, Interrupted, NotFound
from .files import file_sha256
from .hostpath import PathTarget
from .locks import volume_lock
from .names import utc_timestamp
from .report import human_age, human_size
from .volume import VolumeTarget

ENCRYPTED_SUFFIXES = tuple(suffix for _, suffix in offsite.TOOLS.values())
NO_PROJECT = "(no compose project)"


class NoRecoveryPoint(BackupError):
    """No complete set: a source has no archive, or the archives are too far apart."""


class SetRefused(BackupError):
    """An archive of the chosen set failed its check, or a target cannot take it."""


class RestoreFailed(BackupError):
    """A source failed during the restore; the sources restored before it were rolled back."""


class RecoveryPoint:
    """One archive per source: ``archives`` is ``[(source name, when, path)]``, in the
    sources' order."""

    def __init__(self, archives):
        self.archives = archives

    @property
    def time(self):
        return max(when for _, when, _ in self.archives)

    @property
    def spread(self):
        return self.time - min(when for _, when, _ in self.archives)


def recovery_point(found, names, at, max_spread):
    """Give the newest RecoveryPoint of the sources ``names`` at or before ``at``, or None.

    ``found`` is ``catalog.archives_by_source``'s answer. Every time an archive
    was made is a candidate T, newest first; the first whose set (each source's
    newest archive at or before T) lies within ``max_spread`` seconds wins.
    """
    times = {name: sorted(when for when, _ in found.get(name, ())) for name in names}
    paths = {name: dict(found.get(name, ())) for name in names}
    candidates = sorted({when for whens in times.values() for when in whens if when <= at},
                        reverse=True)
    for moment in candidates:
        picks = []
        for name in names:
            index = bisect.bisect_right(times[name], moment) - 1
            if index < 0:
                return None  # and at every older moment too
            picks.append((name, times[name][index]))
        whens = [when for _, when in picks]
        if max(whens) - min(whens) <= max_spread:
            return RecoveryPoint([(name, when, paths[name][when]) for name, when in picks])
    return None


def _no_point(found, names, at, max_spread, folder, at_given):
    """Say why ``recovery_point`` found nothing."""
    missing = [name for name in names if not any(when <= at for when, _ in found.get(name, ()))]
    if missing:
        return ("no archive of %s in %s%s: there is no complete set to restore (leave a "
                "source out with VOLUMES= or OUTPUT_ROOT=); nothing was changed"
                % (", ".join(missing), folder,
                   " at or before %s" % utc_timestamp(at) if at_given else ""))
    newest = ", ".join("%s %s" % (name, utc_timestamp(max(when for when, _ in found[name]
                                                          if when <= at)))
                       for name in names)
    return ("the archives in %s are never all within RESTORE_MAX_SPREAD (%s) of each other "
            "(the newest of each: %s); raise RESTORE_MAX_SPREAD to accept a wider set; nothing "
            "was changed" % (folder, _duration(max_spread), newest))


def _duration(seconds):
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return "%d%s" % (seconds // size, unit)
    return "%ds" % seconds


def _present(sources, folder, reporter):
    """The sources to restore: all, but an OUTPUT_ROOT that neither exists nor has an archive
    in ``folder`` (backup_all skips a missing one, so it never has any) is left out."""
    kept = []
    for source in sources:
        if source.kind == "path" and not os.path.lexists(source.name) and \
                os.path.isdir(folder) and not catalog.archives_by_source(
                    folder, {source.archive_source}, ("",) + ENCRYPTED_SUFFIXES):
            reporter.log("OUTPUT_ROOT %s does not exist and has no archive in %s: left out, as "
                         "backup_all leaves it out" % (source.name, folder))
            continue
        kept.append(source)
    return kept


def choose(folder, names, at, max_spread):
    """Give the RecoveryPoint of ``names`` in ``folder`` at or before ``at`` (None: now), and
    the found archives; raises NoRecoveryPoint saying why there is none."""
    if not os.path.isdir(folder):
        raise NotFound("no folder %s to restore from" % folder)
    found = catalog.archives_by_source(folder, set(names), ("",) + ENCRYPTED_SUFFIXES)
    moment = time.time() if at is None else at
    point = recovery_point(found, names, moment, max_spread)
    if point is None:
        raise NoRecoveryPoint(_no_point(found, names, moment, max_spread, folder,
                                        at is not None))
    return point, found


def plan_lines(point, sources, now):
    """The plan, one line per source: kind, name, archive, age, size."""
    lines = ["Recovery point %s (the set spans %s):" % (utc_timestamp(point.time),
                                                         _duration(point.spread))]
    for source, (_, when, path) in zip(sources, point.archives):
        lines.append("  %s %s: %s (%s, %s)" % (source.kind, source.name, os.path.basename(path),
                                               human_age(now - when),
                                               human_size(os.path.getsize(path))))
    return lines


def _checked(path, identity, plain_folder, reporter):
    """Check the archive ``path`` completely, as verify_backup does (a fetched ``.age`` or
    ``.gpg`` copy: its ``.sha256``, then what it decrypts to, into ``plain_folder``); give
    the path of the plain archive. Raises ArchiveError or BackupError."""
    plain, checksum = path, None
    if offsite.is_encrypted(path):
        checksum = check_checksum(path, file_sha256(path))
        if checksum is None:
            reporter.warn("%s has no .sha256 beside it; only what it decrypts to is checked"
                          % path)
        plain = os.path.join(plain_folder, os.path.basename(path).rsplit(".", 1)[0])
        offsite.decrypt_into(path, identity, plain)
    summary = verify_file(plain, reporter.silent())
    damaged = summary.damaged_databases()
    if damaged:
        raise DatabaseDamaged("; ".join(database.describe() for database in damaged))
    reporter.status("Checked: %s (%d members, %s uncompressed, %s)"
                    % (os.path.basename(path), summary.members, human_size(summary.data_bytes),
                       "sha256 ok" if summary.checksum or checksum else "no .sha256 beside it"))
    return plain


def _refusal(path, when, error, found, names, max_spread):
    """The message for the archive of the set made at ``when`` that failed its check: the
    cause, and the next older complete set (which does not hold it)."""
    cause = "%s [%s]" % (error, error.rule) if isinstance(error, ArchiveError) else str(error)
    older = recovery_point(found, names, when - 1, max_spread)
    hint = ("the next older complete set is %s: restore_all.py --at %s --force"
            % (utc_timestamp(older.time), utc_timestamp(older.time)) if older is not None
            else "there is no older complete set")
    return "the archive %s failed its check: %s; nothing was changed; %s" % (path, cause, hint)


def _targets(sources, point, config):
    """A restore target per source, each checked against its archive (no change yet)."""
    targets = []
    for source, (_, _, path) in zip(sources, point.archives):
        if source.kind == "volume":
            target = VolumeTarget(source.name, config, lock_held=True)
        else:
            target = PathTarget(source.name, config)
        target.check(path)
        targets.append(target)
    return targets


def _users(volumes):
    """The running containers that use any of ``volumes``, each once, the last started
    first (the order to stop them in: dependants before what they depend on)."""
    users = {}
    for volume in volumes:
        if docker.volume_exists(volume):
            for container in docker.containers_using_volume(volume):
                users.setdefault(container.id, container)
    return sorted(users.values(), key=lambda container: container.started_at, reverse=True)


def _grouped(containers):
    """``project: a, b; other: c`` — the containers by their compose project."""
    projects = {}
    for container in reversed(containers):  # in the order they were started
        projects.setdefault(container.project or NO_PROJECT, []).append(container.name)
    return "; ".join("%s: %s" % (project, ", ".join(names))
                     for project, names in sorted(projects.items()))


def restore_stack(config, reporter, at=None, source_folder=None, dry_run=False):
    """Restore every configured source from one recovery point (see the module's docstring).

    ``source_folder``: fetched off-host copies instead of BACKUP_DIR. Gives
    the RecoveryPoint. Raises NoRecoveryPoint or SetRefused with nothing
    changed, RestoreFailed after rolling back, Locked (75) when a backup or
    restore of one of the volumes is running.
    """
    folder = source_folder or config.backup_dir
    sources = _present(configured_sources(config), folder, reporter)
    volumes = [source.name for source in sources if source.kind == "volume"]
    names = [source.archive_source for source in sources]
    for volume in volumes:
        docker.check_volume_name(volume)
    with contextlib.ExitStack() as stack:
        if not dry_run:
            # backup_all's lock too: its retention must not delete an archive of the set,
            # and a run meanwhile gets 75, not a failure per volume.
            if os.path.isdir(config.backup_dir):
                stack.enter_context(backup_all_lock(config.backup_dir))
            for volume in volumes:
                stack.enter_context(volume_lock(volume))
        point, found = choose(folder, names, at, config.restore_max_spread)
        for line in plan_lines(point, sources, time.time()):
            reporter.status(line)
        work_folder = pipeline.work_folder_for(config, reporter)
        plain_folder = None
        if any(offsite.is_encrypted(path) for _, _, path in point.archives):
            plain_folder = stack.enter_context(offsite.private_folder(work_folder))
        plain = []
        for _, when, path in point.archives:
            try:
                plain.append(_checked(path, config.offsite.identity, plain_folder, reporter))
            except BackupError as error:
                raise SetRefused(_refusal(path, when, error, found, names,
                                          config.restore_max_spread))
        targets = _targets(sources, point, config)
        for target in targets:
            target.prepare(reporter)
        users = _users(volumes)
        if dry_run:
            removable = [container.name for container in users if container.auto_remove]
            if removable:
                reporter.status("Would refuse: %s started with --rm, which a stop would "
                                "remove" % ", ".join(removable))
            elif users:
                reporter.status("Would stop, and start again: %s" % _grouped(users))
            reporter.status("Dry run: every archive checked out; nothing was changed")
            return point
        begun = int(time.time())
        with docker.stopped(users, "a volume of the stack", reporter) as pause:
            _restore_each(targets, plain, config, reporter)
        if users:
            reporter.status("Applications were down for %.1f s (%s)"
                            % (pause.seconds, _grouped(users)))
        reporter.status("Restored the recovery point %s: %d sources"
                        % (utc_timestamp(point.time), len(targets)))
        _say_how_to_undo(folder, work_folder, names, begun, config, reporter)
        return point


def _say_how_to_undo(folder, work_folder, names, begun, config, reporter):
    """The safety copies went to the work folder; where that is the folder restored from,
    they are a recovery point of their own: say how to go back to it."""
    if os.path.realpath(work_folder) != os.path.realpath(folder):
        return
    try:
        before, _ = choose(folder, names, None, config.restore_max_spread)
    except BackupError:
        return
    if min(when for _, when, _ in before.archives) >= begun:
        reporter.status("What the stack held before is itself a recovery point now; to go "
                        "back to it: restore_all.py --at %s --force" % utc_timestamp(before.time))


def _restore_each(targets, archives, config, reporter):
    """Restore each target from its archive; on any failure, undo those done before it."""
    done = []
    current = None
    try:
        for target, archive in zip(targets, archives):
            current = target
            done.append((target, pipeline.restore(target, archive, config, reporter)))
    except (BackupError, Interrupted) as error:
        outcomes = []
        for target, restored in reversed(done):
            if restored.undo is None:
                outcomes.append("%s cannot be rolled back" % target.description)
                continue
            outcomes.append(restored.undo(reporter))
            reporter.log(outcomes[-1])
        if isinstance(error, Interrupted):
            raise
        raise RestoreFailed("restoring %s failed: %s; %s" % (
            current.description, error,
            "; ".join(outcomes) if outcomes else "it was the first, so nothing else changed"))


def drill_point(config, reporter, at=None):
    """Restore a whole recovery point of BACKUP_DIR into scratch volumes and a scratch folder,
    and compare each; give ``(point or None, [DrillResult], seconds, problem or None)``.
    Never raises BackupError."""
    started = time.monotonic()
    sources = _present(configured_sources(config), config.backup_dir, reporter)
    names = [source.archive_source for source in sources]
    try:
        point, _ = choose(config.backup_dir, names, at, config.restore_max_spread)
    except BackupError as error:
        return None, [], time.monotonic() - started, str(error)
    results = []
    for source, (_, _, path) in zip(sources, point.archives):
        if source.kind == "volume":
            results.append(drill.drill(source.name, config, reporter, path))
        else:
            results.append(drill.drill_path(source.name, path, config, reporter))
        reporter.status(results[-1].line())
    failed = [result.volume for result in results if result.problem is not None]
    return point, results, time.monotonic() - started, \
        ("failed: %s" % ", ".join(failed) if failed else None)
