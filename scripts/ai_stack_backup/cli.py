"""The command lines: one ``*_main(argv=None) -> int`` per entry script.

Expected failures (BackupError) are printed as ``prog: error: …`` on stderr
and exit 1; the few messages the old scripts printed verbatim keep their
``ERROR: …`` text. SIGTERM/SIGINT run every cleanup and exit 128+N.
Unexpected exceptions keep their traceback.
"""

import argparse
import json
import os
import sys
import time

from .archive import verify_file
from .backupall import Settings, run_backup_all
from .common import DEFAULT_BACKUP_DIR, EXIT_FAILED, EXIT_OK, EXIT_SIGNAL_BASE, BackupError, \
    Interrupted, human_size, log, parse_archive_name, parse_timestamp, stop_signals_raise
from .pathbackup import backup_path, restore_path
from .volume import backup_volume, restore_volume

QUIET_HELP = "no progress line (it only ever appears when stderr is a terminal)"


def _parser(prog, description, examples):
    return argparse.ArgumentParser(
        prog=prog, description=description, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n" + "\n".join("  " + line for line in examples))


def _run(prog, parser, argv, operation, needs_force=False):
    """Parse ``argv`` and run ``operation(arguments)`` with signal handling; give the exit code.

    --help and usage errors give argparse's code (0 and 2). With
    ``needs_force``, a missing --force gives the old scripts' message and 1.
    An int result of the operation is its exit code; anything else means 0.
    """
    try:
        arguments = parser.parse_args(argv)
    except SystemExit as exit:
        return exit.code
    if needs_force and not arguments.force:
        sys.stderr.write("ERROR: restore requires --force\n")
        parser.print_usage(sys.stderr)
        return EXIT_FAILED
    try:
        with stop_signals_raise():
            result = operation(arguments)
        return result if isinstance(result, int) else EXIT_OK
    except BackupError as error:
        if error.legacy:
            sys.stderr.write("ERROR: %s\n" % error)
        else:
            sys.stderr.write("%s: error: %s\n" % (prog, error))
        return error.exit_code
    except Interrupted as interruption:
        log("%s: stopped by %s after cleaning up" % (prog, interruption))
        return EXIT_SIGNAL_BASE + interruption.signum


def backup_docker_volume_main(argv=None):
    prog = "backup_docker_volume.py"
    parser = _parser(prog, "Back up one Docker named volume to BACKUP_DIR/<volume>__<UTC "
                     "timestamp>.tar.gz (mode 0600, owned by you).", [
                         "backup_docker_volume.sh owui-data /srv/ai-stack/backups",
                         "backup_docker_volume.py tm-data          # into /srv/ai-stack/backups",
                         "backup_docker_volume.py owui-data --stop-containers",
                         "backup_docker_volume.py owui-data - | ssh newhost "
                         "restore_docker_volume.py owui-data - --force",
                         "environment: BACKUP_HELPER_IMAGE (default alpine:3.20), "
                         "BACKUP_GZIP_LEVEL (6), BACKUP_THREADS (all CPUs)"])
    parser.add_argument("volume_name", help="the Docker named volume to back up")
    parser.add_argument("backup_dir", nargs="?", default=DEFAULT_BACKUP_DIR,
                        help="folder for the archive, created 0700 if missing; '-' writes the "
                             "archive to stdout (default: %(default)s)")
    parser.add_argument("--stop-containers", action="store_true",
                        help="stop the running containers that use the volume for a consistent "
                             "copy, and start them again afterwards (also on failure)")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return _run(prog, parser, argv, lambda args: backup_volume(
        args.volume_name, args.backup_dir, args.stop_containers, quiet=args.quiet))


def backup_path_main(argv=None):
    prog = "backup_path.py"
    parser = _parser(prog, "Back up a host folder or file to BACKUP_DIR/<safe name>__<UTC "
                     "timestamp>.tar.gz; the archive holds one entry, the path's basename.", [
                         "backup_path.sh /home/wasti/ai_stack_data/transcript-miner/output "
                         "/srv/ai-stack/backups",
                         "backup_path.py /home/wasti/notes - | ssh newhost "
                         "restore_path.py - /home/wasti/notes --force"])
    parser.add_argument("path", help="the folder or file to back up")
    parser.add_argument("backup_dir", nargs="?", default=DEFAULT_BACKUP_DIR,
                        help="folder for the archive; '-' writes it to stdout "
                             "(default: %(default)s)")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return _run(prog, parser, argv,
                lambda args: backup_path(args.path, args.backup_dir, quiet=args.quiet))


def restore_docker_volume_main(argv=None):
    prog = "restore_docker_volume.py"
    parser = _parser(prog, "Replace the contents of a Docker named volume with an archive. The "
                     "whole archive is checked first; the current contents are saved as a "
                     "safety backup and restored automatically if the restore fails.", [
                         "restore_docker_volume.sh owui-data "
                         "/srv/ai-stack/backups/owui-data__20260118T120000Z.tar.gz --force",
                         "restore_docker_volume.py tm-data --force "
                         "/srv/ai-stack/backups/tm-data__20260118T120000Z.tar.gz",
                         "ssh oldhost backup_docker_volume.py owui-data - | "
                         "restore_docker_volume.py owui-data - --force",
                         "environment: BACKUP_DIR (where the safety backup goes; default: "
                         "next to the archive)"])
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
    return _run(prog, parser, argv, lambda args: restore_volume(
        args.volume_name, args.archive, safety_backup=not args.no_safety_backup,
        stop_containers=args.stop_containers, quiet=args.quiet), needs_force=True)


def restore_path_main(argv=None):
    prog = "restore_path.py"
    parser = _parser(prog, "Replace a host path with what a backup_path archive holds. The "
                     "archive is checked completely, extracted next to TARGET and swapped in by "
                     "rename, so a failure leaves TARGET as it was.", [
                         "restore_path.py /srv/ai-stack/backups/"
                         "home_wasti_ai_stack_data_transcript-miner_output__20260118T120000Z"
                         ".tar.gz /home/wasti/ai_stack_data/transcript-miner/output --force"])
    parser.add_argument("archive", help="the .tar.gz made by backup_path, or '-' for stdin")
    parser.add_argument("target", help="the path that was backed up")
    parser.add_argument("--force", action="store_true",
                        help="required: confirms that TARGET's current contents go")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)
    return _run(prog, parser, argv,
                lambda args: restore_path(args.archive, args.target, quiet=args.quiet),
                needs_force=True)


def verify_backup_main(argv=None):
    prog = "verify_backup.py"
    parser = _parser(prog, "Read archives completely with the checks restore uses (gzip CRC "
                     "and length, tar structure, end marker, safety rules); one line each.", [
                         "verify_backup.py /srv/ai-stack/backups/owui-data__20260118T120000Z"
                         ".tar.gz",
                         "verify_backup.py /srv/ai-stack/backups/*.tar.gz"])
    parser.add_argument("archives", nargs="+", metavar="ARCHIVE")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    def verify_all(args):
        failed = 0
        for path in args.archives:
            try:
                summary = verify_file(path, quiet=args.quiet)
                print("OK %s: %d members, %s uncompressed"
                      % (path, summary.members, human_size(summary.data_bytes)), flush=True)
            except BackupError as error:
                failed += 1
                print("FAILED %s: %s" % (path, error), flush=True)
        return EXIT_FAILED if failed else EXIT_OK
    return _run(prog, parser, argv, verify_all)


def _age(seconds):
    seconds = max(0, int(seconds))
    days, rest = divmod(seconds, 86400)
    return "%dd %dh" % (days, rest // 3600) if days else "%dh %dm" % (rest // 3600,
                                                                       rest % 3600 // 60)


def list_archives(folder):
    """Give our archives in ``folder``, grouped by source, newest first within each source."""
    entries = []
    try:
        names = os.listdir(folder)
    except OSError as error:
        raise BackupError("cannot list %s: %s" % (folder, error.strerror))
    now = time.time()
    for name in sorted(names):
        parsed = parse_archive_name(name)
        path = os.path.join(folder, name)
        if parsed is None or not os.path.isfile(path) or os.path.islink(path):
            continue
        source, timestamp = parsed
        entries.append({"source": source, "timestamp": timestamp, "path": path,
                        "size": os.path.getsize(path),
                        "age_seconds": int(now - parse_timestamp(timestamp))})
    entries.sort(key=lambda entry: (entry["source"], entry["timestamp"]), reverse=True)
    entries.sort(key=lambda entry: entry["source"])
    seen = set()
    for entry in entries:
        entry["newest"] = entry["source"] not in seen
        seen.add(entry["source"])
    return entries


def list_backups_main(argv=None):
    prog = "list_backups.py"
    parser = _parser(prog, "List the archives in a backup folder by source: timestamp, size, "
                     "age; the newest of each source is marked.", [
                         "list_backups.py",
                         "list_backups.py /srv/ai-stack/backups --json"])
    parser.add_argument("backup_dir", nargs="?",
                        default=os.environ.get("BACKUP_DIR") or DEFAULT_BACKUP_DIR,
                        help="default: $BACKUP_DIR or %s" % DEFAULT_BACKUP_DIR)
    parser.add_argument("--json", action="store_true", help="print a JSON list of objects")

    def show(args):
        entries = list_archives(args.backup_dir)
        if args.json:
            print(json.dumps(entries, indent=2))
            return
        source = None
        for entry in entries:
            if entry["source"] != source:
                source = entry["source"]
                print("%s%s" % ("" if entry is entries[0] else "\n", source))
            print("  %s  %10s  %8s old%s" % (entry["timestamp"], human_size(entry["size"]),
                                            _age(entry["age_seconds"]),
                                            "  (newest)" if entry["newest"] else ""))
        if not entries:
            print("no archives in %s" % args.backup_dir)
    return _run(prog, parser, argv, show)


def backup_all_main(argv=None):
    prog = "backup_all.py"
    parser = _parser(prog, "Back up every volume and OUTPUT_ROOT, verify each archive, then "
                     "delete old archives. What the systemd timer runs; configured by the "
                     "environment.", [
                         "backup_all.py",
                         "BACKUP_DIR=/srv/ai-stack/backups RETENTION_DAYS=30 backup_all.py",
                         "VOLUMES='owui-data tm-data' STOP_CONTAINERS=1 backup_all.py",
                         "backup_all.py --dry-run",
                         "environment: BACKUP_DIR, OUTPUT_ROOT, RETENTION_DAYS (14), "
                         "RETENTION_MIN_KEEP (3),",
                         "  VOLUMES (default: $OPEN_WEBUI_VOLUME $TOOL_TM_VOLUME context6-data "
                         "context6-cache qdrant-data), STOP_CONTAINERS (0)"])
    parser.add_argument("--dry-run", action="store_true",
                        help="print what would be backed up and deleted; change nothing")
    parser.add_argument("--quiet", action="store_true", help=QUIET_HELP)

    def run(args):
        outcomes = run_backup_all(Settings(), dry_run=args.dry_run, quiet=args.quiet)
        failed = [outcome for outcome in outcomes if outcome.status == "FAILED"]
        if failed:
            log("%s: %d of %d failed: %s" % (prog, len(failed), len(outcomes),
                                             ", ".join(outcome.name for outcome in failed)))
            return EXIT_FAILED
        return EXIT_OK
    return _run(prog, parser, argv, run)
