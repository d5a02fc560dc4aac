"""The command lines: one ``*_main(argv=None) -> int`` per entry script, and nothing else.

Each main only wires argparse: the arguments and the environment are read
once here into a ``Config`` and a ``Reporter`` and handed to the pipeline.
Expected failures (BackupError) are shown as ``prog: error: …`` on stderr
with their exit code; the few messages the old scripts printed verbatim keep
their ``ERROR: …`` text. SIGTERM, SIGINT and SIGHUP run every cleanup and
exit 128+N. Unexpected exceptions keep their traceback.
"""

import argparse
import contextlib
import functools
import json
import os
import signal
import sys

from . import drill, monitor, notify, offsite, pipeline, recovery
from .archive import verify_file
from .catalog import list_archives
from .backupall import run_backup_all
from .config import CONSISTENCY_MODES, DEFAULT_BACKUP_DIR, Config
from .exclusions import Exclusions
from .errors import EXIT_FAILED, EXIT_OK, EXIT_SIGNAL_BASE, EXIT_STATUS_HELP, ArchiveError, \
    BackupError, Interrupted, Locked
from .hostpath import PathSource, PathTarget
from .names import parse_archive_name, parse_point_in_time, utc_timestamp
from .report import Reporter, human_age, human_size
from .volume import VolumeSource, VolumeTarget

QUIET_HELP = "no progress line (it only ever appears when stderr is a terminal)"
EXCLUDE_HELP = ("leave out paths matching PATTERN, relative to the source's root (fnmatch; "
                "'*' also matches '/'; a trailing '/' means a folder and all below it); "
                "repeatable; a restore of the archive leaves these paths out too")
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def _parser(prog, description, examples):
    return argparse.ArgumentParser(
        prog=prog, description=description, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join("  " + line for line in examples)
        + "\n\n" + EXIT_STATUS_HELP)


def _absolute(path):
    """Paths become absolute here, once: the daemon resolves bind mounts from its own cwd."""
    return path if path == "-" else os.path.abspath(path)


@contextlib.contextmanager
def _stop_signals_raise(reporter):
    """Turn the first SIGTERM, SIGINT or SIGHUP into ``Interrupted`` so every cleanup runs.

    Later signals are only logged: a second Ctrl-C must not cut short the
    cleanup (restarting stopped containers, rolling back a restore).
    """
    received = []

    def handler(signum, frame):
        if received:
            reporter.log("%s received again; still cleaning up" % signal.Signals(signum).name)
            return
        received.append(signum)
        raise Interrupted(signum)

    previous = {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}
    try:
        yield
    finally:
        for signum, old_handler in previous.items():
            signal.signal(signum, old_handler)


def _run(prog, parser, argv, operation, needs_force=False, backup_all=False, monitoring=False,
         validate=None):
    """Parse ``argv``, read the environment, run ``operation(arguments, config, reporter)``.

    Gives the exit code: argparse's for --help and usage errors (0 and 2);
    with ``needs_force``, a missing --force gives the old scripts' message
    and 1; an int result of the operation is its exit code, anything else 0.
    """
    try:
        arguments = parser.parse_args(argv)
        if validate is not None:
            validate(arguments)  # parser.error() for combinations argparse cannot express
    except SystemExit as exit:
        return exit.code
    if needs_force and not arguments.force:
        sys.stderr.write("ERROR: restore requires --force\n")
        parser.print_usage(sys.stderr)
        return EXIT_FAILED
    reporter = Reporter(quiet=getattr(arguments, "quiet", False))
    try:
        with _stop_signals_raise(reporter):
            config = Config.from_environment(os.environ, backup_all=backup_all,
                                             monitoring=monitoring)
            result = operation(arguments, config, reporter)
        return result if isinstance(result, int) else EXIT_OK
    except BackupError as error:
        if error.legacy:
            reporter.error(str(error))
        else:
            reporter.log("%s: error: %s" % (prog, error))
        return error.exit_code
    except Interrupted as interruption:
        reporter.log("%s: stopped by %s after cleaning up" % (prog, interruption))
        return EXIT_SIGNAL_BASE + interruption.signum


def backup_docker_volume_main(argv=None):
    prog = "backup_docker_volume.py"
    parser = _parser(prog, "Back up one Docker named volume to BACKUP_DIR/<volume>__<UTC "
                     "timestamp>.tar.gz (mode 0600, owned by you). The archive is complete on "
                     "its own; what the newest archive of the volume there proves unchanged is "
                     "copied from it rather than read again.", [
                         "backup_docker_volume.sh owui-data /srv/ai-stack/backups",
                         "backup_docker_volume.py tm-data          # into /srv/ai-stack/backups",
                         "backup_docker_volume.py owui-data --consistency auto",
                         "backup_docker_volume.py qdrant-data --consistency stop",
                         "backup_docker_volume.py owui-data --exclude cache/ --exclude '*.tmp'",
                         "backup_docker_volume.py context6-cache --skip-unchanged",
                         "backup_docker_volume.py owui-data - | ssh newhost "
                         "restore_docker_volume.py owui-data - --force",
                         "environment: BACKUP_HELPER_IMAGE (default alpine:3.20), "
                         "BACKUP_GZIP_LEVEL (6), BACKUP_THREADS (all CPUs)"])
    parser.add_argument("volume_name", help="the Docker named volume to back up")
    parser.add_argument("backup_dir", nargs="?", default=DEFAULT_BACKUP_DIR,
                        help="folder for the archive, created 0700 if missing; '-' writes the "
                             "archive to stdout (default: %(default)s)")
    consistency = parser.add_mutually_exclusive_group()
    consistency.add_argument(
        "--consistency", choices=CONSISTENCY_MODES, default="live",
        help="how to copy a volume apps may be writing: live (the old plain copy; the default "
             "here, so the runbook's command never stops containers by surprise), stop (stop "
             "the containers using it for the copy, then start exactly those again), sqlite "
             "(snapshot every SQLite database through SQLite in the app's own image), auto "
             "(look and choose; what backup_all does)")
    consistency.add_argument("--stop-containers", dest="consistency", action="store_const",
                             const="stop", help="the same as --consistency stop")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help=EXCLUDE_HELP)
    parser.add_argument("--skip-unchanged", action="store_true",
                        help="if nothing in the volume changed since its newest archive here "
                             "(checked by a listing of every entry), publish the new name as a "
                             "hard link to that archive: no compression, no new disk; so too "
                             "if the new archive comes out byte for byte that one (a volume "
                             "restored from it) (backup_all does this by default)")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    def validate(args):
        if args.skip_unchanged and args.backup_dir == "-":
            parser.error("--skip-unchanged needs a backup folder, not '-'")

    def back_up(args, config, reporter):
        pipeline.backup(VolumeSource(args.volume_name, config, args.consistency,
                                     Exclusions(args.exclude)),
                        _absolute(args.backup_dir), config, reporter,
                        skip_unchanged=args.skip_unchanged)
    return _run(prog, parser, argv, back_up, validate=validate)


def backup_path_main(argv=None):
    prog = "backup_path.py"
    parser = _parser(prog, "Back up a host folder or file to BACKUP_DIR/<safe name>__<UTC "
                     "timestamp>.tar.gz; the archive holds one entry, the path's basename. What "
                     "the newest archive of the path there proves unchanged is copied from it.", [
                         "backup_path.sh /home/wasti/ai_stack_data/transcript-miner/output "
                         "/srv/ai-stack/backups",
                         "backup_path.py /home/wasti/notes - | ssh newhost "
                         "restore_path.py - /home/wasti/notes --force",
                         "backup_path.py /home/wasti/ai_stack_data/transcript-miner/output "
                         "--exclude 'tmp/' --exclude '*.part'"])
    parser.add_argument("path", help="the folder or file to back up")
    parser.add_argument("backup_dir", nargs="?", default=DEFAULT_BACKUP_DIR,
                        help="folder for the archive; '-' writes it to stdout "
                             "(default: %(default)s)")
    parser.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help=EXCLUDE_HELP)
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return _run(prog, parser, argv, lambda args, config, reporter: pipeline.backup(
        PathSource(args.path, Exclusions(args.exclude)), _absolute(args.backup_dir), config,
        reporter))


def restore_docker_volume_main(argv=None):
    prog = "restore_docker_volume.py"
    parser = _parser(prog, "Replace the contents of a Docker named volume with an archive. For a "
                     "volume with data, the whole archive is checked first, and the current "
                     "contents are saved as a safety backup and restored automatically if the "
                     "restore fails. An empty or missing volume is filled as the archive is "
                     "checked, in one pass, and emptied again (or removed) if it is refused.", [
                         "restore_docker_volume.sh owui-data "
                         "/srv/ai-stack/backups/owui-data__20260118T120000Z.tar.gz --force",
                         "restore_docker_volume.py tm-data --force "
                         "/srv/ai-stack/backups/tm-data__20260118T120000Z.tar.gz",
                         "ssh oldhost backup_docker_volume.py owui-data - | "
                         "restore_docker_volume.py owui-data - --force",
                         "environment: BACKUP_DIR (where the safety backup and work files go; "
                         "default: /srv/ai-stack/backups if it exists and is private to you, "
                         "else ~/.cache/ai-stack-backup; never next to the archive)"])
    parser.add_argument("volume_name", help="the volume to restore into (created if missing)")
    parser.add_argument("archive", help="the .tar.gz to restore, or '-' for stdin")
    parser.add_argument("--force", action="store_true",
                        help="required: confirms that the volume's current contents go")
    parser.add_argument("--no-safety-backup", action="store_true",
                        help="do not save the current contents first (no automatic rollback)")
    parser.add_argument("--stop-containers", action="store_true",
                        help="stop the running containers that use the volume, and start them "
                             "again afterwards; without it, a volume in use is refused")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return _run(prog, parser, argv, lambda args, config, reporter: pipeline.restore(
        VolumeTarget(args.volume_name, config, safety_copy=not args.no_safety_backup,
                     stop_containers=args.stop_containers), _absolute(args.archive), config,
        reporter),
        needs_force=True)


def restore_path_main(argv=None):
    prog = "restore_path.py"
    parser = _parser(prog, "Replace a host path with what a backup_path archive holds. The "
                     "archive is checked completely, extracted next to TARGET and swapped in by "
                     "rename, so a failure leaves TARGET as it was. TARGET's current contents "
                     "are saved first as an ordinary archive in BACKUP_DIR.", [
                         "restore_path.py /srv/ai-stack/backups/"
                         "home_wasti_ai_stack_data_transcript-miner_output__20260118T120000Z"
                         ".tar.gz /home/wasti/ai_stack_data/transcript-miner/output --force"])
    parser.add_argument("archive", help="the .tar.gz made by backup_path, or '-' for stdin")
    parser.add_argument("target", help="the path that was backed up")
    parser.add_argument("--force", action="store_true",
                        help="required: confirms that TARGET's current contents go")
    parser.add_argument("--no-safety-backup", action="store_true",
                        help="do not save TARGET's current contents first")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return _run(prog, parser, argv, lambda args, config, reporter: pipeline.restore(
        PathTarget(_absolute(args.target), config, safety_copy=not args.no_safety_backup),
        _absolute(args.archive), config, reporter), needs_force=True)


def verify_backup_main(argv=None):
    prog = "verify_backup.py"
    parser = _parser(prog, "Read archives completely with the checks restore uses (gzip CRC "
                     "and length, tar structure, end marker, safety rules), and run SQLite's "
                     "integrity_check on every database inside; one line each, and one line "
                     "per database.", [
                         "verify_backup.py /srv/ai-stack/backups/owui-data__20260118T120000Z"
                         ".tar.gz",
                         "verify_backup.py /srv/ai-stack/backups/*.tar.gz",
                         "OFFSITE_IDENTITY=~/backup-key.txt verify_backup.py "
                         "owui-data__20260118T120000Z.tar.gz.age   # a fetched off-host copy"])
    parser.add_argument("archives", nargs="+", metavar="ARCHIVE")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    def verify_all(args, config, reporter):
        failed = 0
        for path in args.archives:
            decrypted = None
            if offsite.is_encrypted(path):  # an off-host copy, fetched back
                decrypted = functools.partial(offsite.decrypted,
                                              identity=config.offsite.identity)
            try:
                summary = verify_file(path, reporter, decrypted)
            except ArchiveError as error:
                failed += 1
                reporter.status("FAILED %s: %s [%s]" % (path, error, error.rule))
                continue
            except BackupError as error:
                failed += 1
                reporter.status("FAILED %s: %s" % (path, error))
                continue
            damaged = summary.damaged_databases()
            failed += bool(damaged)
            reporter.status("%s %s: %d members, %s uncompressed%s%s"
                            % ("FAILED" if damaged else "OK", path, summary.members,
                               human_size(summary.data_bytes), _databases(summary),
                               ", sha256 ok" if summary.checksum else ", no .sha256 beside it"))
            for database in summary.databases:
                reporter.status("  " + database.describe())
        return EXIT_FAILED if failed else EXIT_OK
    return _run(prog, parser, argv, verify_all)


def _mark(entry):
    if entry["failed_verification"]:
        return "  (failed verification: not a backup)"
    shared = ""
    if entry["same_data_as"]:
        others = [parse_archive_name(os.path.basename(path))[1] if parse_archive_name(
            os.path.basename(path)) else os.path.basename(path) for path in entry["same_data_as"]]
        shared = "  (same file as %s%s: stored once)" % (
            ", ".join(others[:3]), ", …" if len(others) > 3 else "")
    return ("  (newest)" if entry["newest"] else "") + shared + \
        ("" if entry["sha256"] else "  (no .sha256)")


def _databases(summary):
    count = len(summary.databases)
    return ", %d SQLite database%s" % (count, "" if count == 1 else "s") if count else ""


def list_backups_main(argv=None):
    prog = "list_backups.py"
    parser = _parser(prog, "List the archives in a backup folder by source: timestamp, size, "
                     "age; the newest of each source is marked, and so are names that share "
                     "one file (skip-if-unchanged hard links).", [
                         "list_backups.py",
                         "list_backups.py /srv/ai-stack/backups --json"])
    parser.add_argument("backup_dir", nargs="?",
                        help="default: $BACKUP_DIR or %s" % DEFAULT_BACKUP_DIR)
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects")

    def show(args, config, reporter):
        folder = args.backup_dir or config.backup_dir
        entries = list_archives(folder)
        if args.json:
            reporter.status(json.dumps(entries, indent=2))
            return
        source = None
        for entry in entries:
            if entry["source"] != source:
                source = entry["source"]
                reporter.status("%s%s" % ("" if entry is entries[0] else "\n", source))
            reporter.status("  %s  %10s  %12s%s"
                            % (entry["timestamp"], human_size(entry["size"]),
                               human_age(entry["age_seconds"]), _mark(entry)))
        if not entries:
            reporter.status("no archives in %s" % folder)
    return _run(prog, parser, argv, show)


def backup_all_main(argv=None):
    prog = "backup_all.py"
    parser = _parser(prog, "Back up every volume and OUTPUT_ROOT, verify each archive, then "
                     "delete old archives. What the systemd timer runs; configured by the "
                     "environment.", [
                         "backup_all.py",
                         "BACKUP_DIR=/srv/ai-stack/backups RETENTION_DAYS=30 backup_all.py",
                         "BACKUP_CONSISTENCY='owui-data=sqlite qdrant-data=stop' backup_all.py",
                         "VOLUMES='owui-data tm-data' BACKUP_CONSISTENCY=live backup_all.py",
                         "RETENTION_DAILY=7 RETENTION_WEEKLY=4 RETENTION_MONTHLY=12 "
                         "backup_all.py --dry-run   # which rule keeps what",
                         "RETENTION_HOURLY=24 RETENTION_DAILY=14 backup_all.py   # run hourly",
                         "BACKUP_EXCLUDE='owui-data:cache/ tm-data:*.tmp' backup_all.py",
                         "OFFSITE_ENCRYPT=age:age1… OFFSITE_COMMAND='rclone copyto \"$1\" "
                         "b2:bucket/ai-stack/\"$(basename \"$1\")\"' backup_all.py",
                         "environment: BACKUP_DIR, OUTPUT_ROOT, RETENTION_DAYS (14), "
                         "RETENTION_MIN_KEEP (3),",
                         "  RETENTION_HOURLY, RETENTION_DAILY, RETENTION_WEEKLY, "
                         "RETENTION_MONTHLY (0: off), "
                         "RETENTION_SHRINK_GUARD (50 percent; 0: off),",
                         "  BACKUP_EXCLUDE (SOURCE:PATTERN entries),",
                         "  VOLUMES (default: $OPEN_WEBUI_VOLUME $TOOL_TM_VOLUME context6-data "
                         "context6-cache qdrant-data),",
                         "  BACKUP_CONSISTENCY (VOLUME=MODE entries and one default MODE; "
                         "modes auto, sqlite, stop, live;",
                         "  default auto), STOP_CONTAINERS=1 (the default mode becomes stop),",
                         "  METRICS_FILE (…/ai_stack_backup.prom), HEALTHCHECK_URL, NOTIFY_URL, "
                         "NOTIFY_URL_HEADERS (see README: Monitoring),",
                         "  BACKUP_SKIP_UNCHANGED (1), OFFSITE_COMMAND, OFFSITE_ENCRYPT "
                         "(age:RECIPIENT… or gpg:KEYID), OFFSITE_TIMEOUT (3600),",
                         "  OFFSITE_ALLOW_PLAINTEXT (see README: Off-host copies)"])
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be backed up, which rule keeps each archive and "
                             "what would be deleted; change nothing")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    def run(args, config, reporter):
        if args.dry_run:
            run_backup_all(config, reporter, dry_run=True)
            return EXIT_OK
        watch = monitor.Watch(config, reporter)
        try:
            outcomes = run_backup_all(config, reporter, on_start=watch.started)
        except Locked:
            raise  # another run is on it; that run reports
        except BackupError as error:
            watch.failed(error)
            raise
        problems = watch.finished(outcomes)
        failed = [outcome for outcome in outcomes if outcome.failed]
        if failed:
            reporter.log("%s: %d of %d failed: %s"
                         % (prog, len(failed), len(outcomes),
                            ", ".join(outcome.name for outcome in failed)))
        return EXIT_FAILED if failed or problems else EXIT_OK
    return _run(prog, parser, argv, run, backup_all=True)


def report_failure_main(argv=None):
    prog = "report_failure.py"
    parser = _parser(prog, "Tell a person that a backup run failed: one line in the journal, "
                     "and a plain-text POST to NOTIFY_URL when that is set (unless the run "
                     "sent its own). systemd runs it as ai_stack_backup-failure.service "
                     "(OnFailure=), with the failed unit's outcome in MONITOR_* variables.", [
                         "report_failure.py",
                         "NOTIFY_URL=https://ntfy.sh/my-backups report_failure.py",
                         "NOTIFY_URL=https://gotify.example/message "
                         "NOTIFY_URL_HEADERS='X-Gotify-Key: …' report_failure.py"])

    def report(args, config, reporter):
        environ = os.environ
        failure = notify.Failure(
            environ.get("MONITOR_UNIT", ""), environ.get("MONITOR_SERVICE_RESULT", ""),
            environ.get("MONITOR_EXIT_CODE", ""), environ.get("MONITOR_EXIT_STATUS", ""),
            environ.get("MONITOR_INVOCATION_ID", ""))
        reporter.log(failure.line())
        if not config.notify_url:
            return EXIT_OK
        if monitor.already_notified(config, failure.invocation):
            reporter.log("the run sent its own failure message to %s; not sending another"
                         % notify.mask(config.notify_url))
            return EXIT_OK
        notify.send(config.notify_url, failure.line() + "\n", config.notify_headers)
        reporter.log("sent to %s" % notify.mask(config.notify_url))
        return EXIT_OK
    return _run(prog, parser, argv, report, monitoring=True)


def drill_restore_main(argv=None):
    prog = "drill_restore.py"
    parser = _parser(prog, "Try the restore before it is needed: for each volume, restore its "
                     "newest archive in BACKUP_DIR into a fresh scratch volume (never the real "
                     "one), compare the restored tree with the archive (names, types, sizes, "
                     "modes, owners, mtimes, contents, link targets), check its SQLite "
                     "databases, and remove the scratch volume. One line per volume. With "
                     "--all, the whole stack as restore_all would restore it: one recovery "
                     "point, every volume and OUTPUT_ROOT (into a scratch folder), and the "
                     "whole set's time.", [
                         "drill_restore.py                 # every volume backup_all backs up",
                         "drill_restore.py --all           # the recovery point restore_all "
                         "would take (the weekly unit)",
                         "drill_restore.py owui-data qdrant-data",
                         "BACKUP_DIR=/srv/ai-stack/backups drill_restore.py tm-data"])
    parser.add_argument("volumes", nargs="*", metavar="VOLUME",
                        help="default: the volumes backup_all is configured for (VOLUMES)")
    parser.add_argument("--all", action="store_true",
                        help="drill the newest recovery point: every volume and OUTPUT_ROOT "
                             "from one set of archives (see restore_all.py)")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    def validate(args):
        if args.all and args.volumes:
            parser.error("--all drills every configured source; name no volumes with it")

    def run_drills(args, config, reporter):
        if args.all:
            point, results, seconds, problem = recovery.drill_point(config, reporter)
            if point is None:
                reporter.status("DRILL FAILED stack: %s" % problem)
            else:
                reporter.status("DRILL %s stack %s %d sources %.1f" % (
                    "FAILED" if problem else "ok", utc_timestamp(point.time),
                    len(results), seconds))
            problems = monitor.stack_drill_finished(
                config, point.time if point else None, results, seconds, problem is None,
                reporter)
            return EXIT_FAILED if problem or problems else EXIT_OK
        results = []
        for volume in args.volumes or config.volumes:
            results.append(drill.drill(volume, config, reporter))
            reporter.status(results[-1].line())
        problems = monitor.drill_finished(config, results, reporter)
        failed = [result for result in results if result.problem is not None]
        return EXIT_FAILED if failed or problems else EXIT_OK
    return _run(prog, parser, argv, run_drills, backup_all=True, validate=validate)


def restore_all_main(argv=None):
    prog = "restore_all.py"
    parser = _parser(prog, "Restore the whole stack, every volume backup_all backs up and "
                     "OUTPUT_ROOT, from one recovery point: the newest time at or before --at "
                     "for which every source has an archive, all within RESTORE_MAX_SPREAD of "
                     "each other. The plan is shown first; every archive of the set is read "
                     "and checked completely before anything changes. The containers using "
                     "the volumes are stopped once, and started again in the order they were "
                     "started. Each restore keeps its safety copy: if any source fails, the "
                     "ones restored before it are rolled back. Configured like backup_all.", [
                         "restore_all.py --dry-run                    # the plan and the "
                         "checks; nothing changes",
                         "restore_all.py --force                      # last night's stack",
                         "restore_all.py --at '2026-12-03 04:00' --force",
                         "OFFSITE_IDENTITY=~/backup-key.txt restore_all.py --from "
                         "/root/fetched --force   # a new host",
                         "environment: BACKUP_DIR, VOLUMES, OUTPUT_ROOT (as backup_all), "
                         "RESTORE_MAX_SPREAD (6h; s, m, h or d), OFFSITE_IDENTITY"])
    parser.add_argument("--at", metavar="TIME",
                        help="the newest set at or before TIME, in UTC: 2026-12-03 04:00 or an "
                             "archive's 20261203T040000Z (default: now)")
    parser.add_argument("--from", dest="source_folder", metavar="FOLDER",
                        help="restore from a folder of fetched off-host copies (.tar.gz, .age, "
                             ".gpg, with their .sha256) instead of BACKUP_DIR")
    parser.add_argument("--dry-run", action="store_true",
                        help="show the plan and check every archive of the set; change nothing")
    parser.add_argument("--force", action="store_true",
                        help="required (but for --dry-run): confirms that the current contents "
                             "of every volume and of OUTPUT_ROOT go")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    def validate(args):
        if args.at is not None:
            try:
                args.at = parse_point_in_time(args.at)
            except ValueError:
                parser.error("--at: %r is not a time like 2026-12-03 04:00 or 20261203T040000Z "
                             "(UTC)" % args.at)
        if args.dry_run:
            args.force = True  # a dry run changes nothing
        if args.source_folder is not None:
            args.source_folder = _absolute(args.source_folder)

    return _run(prog, parser, argv, lambda args, config, reporter: recovery.restore_stack(
        config, reporter, args.at, args.source_folder, args.dry_run),
        needs_force=True, backup_all=True, validate=validate)
