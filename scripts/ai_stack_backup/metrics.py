"""Prometheus metrics in the text exposition format, for node_exporter's textfile collector.

read the file (the state) → replace this run's samples → write a temp file → rename

The file is the state: ``last_success_timestamp_seconds`` of a source
survives a failed run, and backup_all and drill_restore each replace only
their own samples, under a lock (``<file>.lock``), so neither loses the
other's. The temp file never ends in ``.prom``, so the collector never reads
a half-written one.

The metrics folder belongs to others too (node_exporter's account may write
it), so every name in it is opened through a descriptor of the folder
without following symlinks: a planted symlink is never read through (it is
replaced by our file) and never written through. The lock is 0600 and ours,
so no other user can hold it; and it is waited for a few seconds at most: a
run whose metrics lock is busy skips the update with a warning and goes on.
Nothing read from the file ever reaches a log.
"""

import contextlib
import errno
import fcntl
import os
import re
import secrets
import stat
import time

from .errors import BackupError, describe_os_error
from .locks import LockRefused, open_lock_file

PREFIX = "ai_stack_backup_"
# name (without PREFIX), type, help; written in this order.
FAMILIES = (
    ("last_run_timestamp_seconds", "gauge", "When backup_all last tried this source (Unix time)."),
    ("last_run_success", "gauge", "1 if the last backup_all run backed up and verified this "
                                  "source, 0 if it failed or was suspicious."),
    ("last_success_timestamp_seconds", "gauge", "When this source was last backed up and "
                                                "verified (Unix time); kept across failed runs."),
    ("archive_size_bytes", "gauge", "Size of the newest verified archive of this source."),
    ("uncompressed_size_bytes", "gauge", "File data in the newest verified archive."),
    ("members", "gauge", "Members (files, folders, links) in the newest verified archive."),
    ("duration_seconds", "gauge", "How long the last backup of this source took, "
                                  "verification included."),
    ("app_pause_seconds", "gauge", "How long the apps using this volume were stopped for the "
                                   "last backup (0: not stopped)."),
    ("archives_kept", "gauge", "Archives of this source in the backup folder after retention."),
    ("info", "gauge", "Always 1; the consistency mode of the last backup as a label."),
    ("offsite_success", "gauge", "1 if the last off-host copy (OFFSITE_COMMAND) of this "
                                 "source got through, else 0."),
    ("drill_success", "gauge", "1 if the last restore drill of this volume passed, else 0."),
    ("drill_duration_seconds", "gauge", "How long the last restore drill of this volume took."),
    ("drill_timestamp_seconds", "gauge", "When this volume was last drilled (Unix time)."),
    ("stack_drill_success", "gauge", "1 if the last drill of a whole recovery point "
                                     "(drill_restore.py --all) passed for every source, else 0."),
    ("stack_drill_duration_seconds", "gauge", "How long the last drill of a whole recovery point "
                                              "took: the time to restore the stack."),
    ("recovery_point_age_seconds", "gauge", "Age of the recovery point the last whole drill "
                                            "restored, when it ran (the newest complete set)."),
)
NAMES = tuple(PREFIX + name for name, _, _ in FAMILIES)
DRILL_FAMILIES = tuple(name for name in NAMES if name.startswith(
    (PREFIX + "drill_", PREFIX + "stack_drill_", PREFIX + "recovery_point_")))
BACKUP_FAMILIES = tuple(name for name in NAMES if name not in DRILL_FAMILIES)
FILE_MODE = 0o644  # node_exporter runs as another user; the figures hold no secrets
LOCK_MODE = 0o600  # nobody else may hold it
LOCK_WAIT = 5.0  # seconds; then this run's update is skipped, never the run stopped
READ_LIMIT = 1 << 20  # our own file is a few kB

_SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)')
_LABEL = re.compile(r'\s*([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"\s*(?:,|$)')


def _escape(value):
    return value.replace("\\", "\\\\").replace("\"", "\\\"").replace("\n", "\\n")


def _unescape(value):
    return re.sub(r"\\(.)", lambda match: "\n" if match.group(1) == "n" else match.group(1),
                  value)


def _labels(text):
    labels, position = [], 0
    while position < len(text):
        match = _LABEL.match(text, position)
        if not match:
            raise ValueError("bad labels")
        labels.append((match.group(1), _unescape(match.group(2))))
        position = match.end()
    return tuple(labels)


def parse(text):
    """Give ``{name: {labels: value}}`` of a file in our format (labels: tuple of pairs).

    Comments and families not ours are dropped; raises ValueError naming the
    number of a line that is no sample (never its text: the file may not be ours).
    """
    samples = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        match = _SAMPLE.fullmatch(line.strip())
        try:
            if not match:
                raise ValueError()
            name, labels, value = match.groups()
            if name in NAMES:
                samples.setdefault(name, {})[_labels(labels or "")] = float(value)
        except ValueError:
            raise ValueError("line %d is not a sample" % number) from None
    return samples


def _number(value):
    value = round(float(value), 3)  # milliseconds are all any alert needs
    return str(int(value)) if value.is_integer() else repr(value)


def render(samples):
    """Give the exposition text: every family with samples, HELP and TYPE first."""
    lines = []
    for (_, kind, text), name in zip(FAMILIES, NAMES):
        if not samples.get(name):
            continue
        lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
        for labels, value in sorted(samples[name].items()):
            label_text = ",".join('%s="%s"' % (key, _escape(label)) for key, label in labels)
            lines.append("%s%s %s" % (name, "{%s}" % label_text if label_text else "",
                                      _number(value)))
    return "\n".join(lines) + "\n"


def source_labels(source, **extra):
    return (("source", source),) + tuple(sorted(extra.items()))


def _take_lock(folder, name, path, reporter):
    """Give a descriptor holding the lock ``name`` in the folder ``folder`` (a descriptor),
    or None (with a warning) when it is not ours or stays busy for LOCK_WAIT seconds."""
    try:
        descriptor = open_lock_file(name, LOCK_MODE, dir_fd=folder)
    except LockRefused as error:
        reporter.warn("%s; the metrics file %s is not updated this run" % (error, path))
        return None
    try:
        owner = os.fstat(descriptor).st_uid
        if owner != os.geteuid():
            reporter.warn("the metrics lock %s.lock belongs to user %d, not this one; the "
                          "metrics file is not updated this run" % (path, owner))
            os.close(descriptor)
            return None
        os.fchmod(descriptor, LOCK_MODE)  # one left 0644 by an earlier version
        give_up = time.monotonic() + LOCK_WAIT
        while True:
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return descriptor
            except BlockingIOError:
                if time.monotonic() >= give_up:
                    break
                time.sleep(0.1)
    except BaseException:
        os.close(descriptor)
        raise
    os.close(descriptor)
    reporter.warn("the metrics lock %s.lock stayed busy for %g s; the metrics file is not "
                  "updated this run" % (path, LOCK_WAIT))
    return None


def _read(folder, name, path, reporter):
    """Give the samples of our file ``name`` in ``folder`` ({} when there is none to read)."""
    try:
        descriptor = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                             dir_fd=folder)
    except FileNotFoundError:
        return {}
    except OSError as error:
        cause = "it is a symbolic link" if error.errno == errno.ELOOP \
            else describe_os_error(error)
        reporter.warn("metrics file %s not read (%s); starting it afresh" % (path, cause))
        return {}
    try:
        if not stat.S_ISREG(os.fstat(descriptor).st_mode):
            reporter.warn("metrics file %s not read (not a regular file); starting it afresh"
                          % path)
            return {}
        data = os.read(descriptor, READ_LIMIT + 1)
    finally:
        os.close(descriptor)
    try:
        if len(data) > READ_LIMIT:
            raise ValueError("larger than %d bytes" % READ_LIMIT)
        return parse(data.decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        cause = "not UTF-8" if isinstance(error, UnicodeDecodeError) else str(error)
        reporter.warn("metrics file %s could not be read (%s); starting it afresh"
                      % (path, cause))
        return {}


def _write(folder, name, text):
    """Replace ``name`` in ``folder`` by a new file holding ``text`` (FILE_MODE), atomically."""
    temp = ".%s.%s.tmp" % (name, secrets.token_hex(6))
    descriptor = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW |
                         os.O_CLOEXEC, 0o600, dir_fd=folder)
    try:
        with os.fdopen(descriptor, "w") as file:
            file.write(text)
            file.flush()
            os.fchmod(file.fileno(), FILE_MODE)
            os.fsync(file.fileno())
        os.replace(temp, name, src_dir_fd=folder, dst_dir_fd=folder)
        temp = None
    finally:
        if temp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp, dir_fd=folder)


def update(path, change, reporter):
    """Apply ``change(samples)`` to the metrics file at ``path`` and write it atomically.

    A file that cannot be parsed is started afresh (and the log says so); a
    lock that stays busy skips the update (and the log says so). Raises
    BackupError when the file cannot be written.
    """
    name = os.path.basename(path)
    try:
        folder = os.open(os.path.dirname(os.path.abspath(path)),
                         os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            lock = _take_lock(folder, name + ".lock", path, reporter)
            if lock is None:
                return
            try:
                samples = _read(folder, name, path, reporter)
                change(samples)
                _write(folder, name, render(samples))
            finally:
                os.close(lock)
        finally:
            os.close(folder)
    except OSError as error:
        raise BackupError("cannot write the metrics file %s: %s"
                          % (path, describe_os_error(error)))


def backup_run(samples, outcomes, sources, now, kept):
    """Replace backup_all's samples: one set per configured source (``sources``: names).

    ``outcomes`` maps a source's name to its Outcome (none when the run failed
    before the sources); ``kept`` maps it to its archive count after retention.
    Samples of sources no longer configured go; a source's last success and
    the figures of its newest good archive are kept when this run failed.
    """
    before = {name: samples.pop(name, {}) for name in BACKUP_FAMILIES}

    def put(short, source, value, **extra):
        samples.setdefault(PREFIX + short, {})[source_labels(source, **extra)] = value

    def keep(short, source):
        for labels, value in before[PREFIX + short].items():
            if dict(labels).get("source") == source:
                samples.setdefault(PREFIX + short, {})[labels] = value

    for source in sources:
        outcome = outcomes.get(source)
        put("last_run_timestamp_seconds", source, now)
        good = outcome is not None and outcome.status == "ok"
        put("last_run_success", source, 1 if good or (outcome is not None and
                                                     outcome.status == "skipped") else 0)
        if good:
            put("last_success_timestamp_seconds", source, now)
        else:
            keep("last_success_timestamp_seconds", source)
        figures = {}
        if outcome is not None and outcome.archive:  # ok, or SUSPICIOUS: a verified archive
            figures = {"archive_size_bytes": outcome.size,
                       "uncompressed_size_bytes": outcome.data_bytes,  # None when linked
                       "members": outcome.members, "app_pause_seconds": outcome.pause_seconds}
            put("info", source, 1, consistency=outcome.mode)
        else:
            keep("info", source)
        for short in ("archive_size_bytes", "uncompressed_size_bytes", "members",
                      "app_pause_seconds"):
            if figures.get(short) is not None:
                put(short, source, figures[short])
            else:
                keep(short, source)
        if outcome is not None:
            put("duration_seconds", source, outcome.seconds)
        else:
            keep("duration_seconds", source)
        if source in kept:
            put("archives_kept", source, kept[source])
        else:
            keep("archives_kept", source)
        if outcome is not None and outcome.offsite is not None:
            put("offsite_success", source, 1 if outcome.offsite else 0)
        else:
            keep("offsite_success", source)


def drill_run(samples, results, now):
    """Replace the drill samples of the volumes in ``results`` (DrillResults); keep others'."""
    for result in results:
        labels = source_labels(result.volume)
        samples.setdefault(PREFIX + "drill_success", {})[labels] = \
            0 if result.problem is not None else 1
        samples.setdefault(PREFIX + "drill_duration_seconds", {})[labels] = result.seconds
        samples.setdefault(PREFIX + "drill_timestamp_seconds", {})[labels] = now


def stack_drill_run(samples, point_time, seconds, success, now):
    """Replace the samples of the drill of a whole recovery point (``point_time``: its time,
    None when there was none to drill)."""
    samples[PREFIX + "stack_drill_success"] = {(): 1 if success else 0}
    samples[PREFIX + "stack_drill_duration_seconds"] = {(): seconds}
    if point_time is not None:
        samples[PREFIX + "recovery_point_age_seconds"] = {(): now - point_time}
    else:
        samples.pop(PREFIX + "recovery_point_age_seconds", None)
