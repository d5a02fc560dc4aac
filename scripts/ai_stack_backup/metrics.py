"""Prometheus metrics in the text exposition format, for node_exporter's textfile collector.

read the file (the state) → replace this run's samples → write a temp file → rename

The file is the state: ``last_success_timestamp_seconds`` of a source
survives a failed run, and backup_all and drill_restore each replace only
their own samples, under a lock (``<file>.lock``), so neither loses the
other's. The temp file never ends in ``.prom``, so the collector never reads
a half-written one.
"""

import contextlib
import fcntl
import os
import re
import tempfile

from .errors import BackupError, describe_os_error

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
)
NAMES = tuple(PREFIX + name for name, _, _ in FAMILIES)
DRILL_FAMILIES = tuple(name for name in NAMES if name.startswith(PREFIX + "drill_"))
BACKUP_FAMILIES = tuple(name for name in NAMES if name not in DRILL_FAMILIES)
FILE_MODE = 0o644  # node_exporter runs as another user; the figures hold no secrets

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
            raise ValueError("bad labels: %r" % text)
        labels.append((match.group(1), _unescape(match.group(2))))
        position = match.end()
    return tuple(labels)


def parse(text):
    """Give ``{name: {labels: value}}`` of a file in our format (labels: tuple of pairs).

    Comments and families not ours are dropped; raises ValueError on a line
    that is no sample.
    """
    samples = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        match = _SAMPLE.fullmatch(line.strip())
        if not match:
            raise ValueError("not a sample: %r" % line)
        name, labels, value = match.groups()
        if name in NAMES:
            samples.setdefault(name, {})[_labels(labels or "")] = float(value)
    return samples


def _number(value):
    value = round(float(value), 3)  # milliseconds are all any alert needs
    return str(int(value)) if value.is_integer() else repr(value)


def render(samples):
    """Give the exposition text: every family with samples, HELP and TYPE first."""
    lines = []
    for (short, kind, text), name in zip(FAMILIES, NAMES):
        if not samples.get(name):
            continue
        lines += ["# HELP %s %s" % (name, text), "# TYPE %s %s" % (name, kind)]
        for labels, value in sorted(samples[name].items()):
            label_text = ",".join('%s="%s"' % (key, _escape(label)) for key, label in labels)
            lines.append("%s{%s} %s" % (name, label_text, _number(value)))
    return "\n".join(lines) + "\n"


def source_labels(source, **extra):
    return (("source", source),) + tuple(sorted(extra.items()))


@contextlib.contextmanager
def _locked(path):
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def update(path, change, reporter):
    """Apply ``change(samples)`` to the metrics file at ``path`` and write it atomically.

    A file that cannot be parsed is started afresh (and the log says so).
    Raises BackupError when the file cannot be written.
    """
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with _locked(path):
            samples = {}
            try:
                with open(path) as file:
                    samples = parse(file.read())
            except FileNotFoundError:
                pass
            except (ValueError, UnicodeDecodeError) as error:
                reporter.warn("metrics file %s could not be read (%s); starting it afresh"
                              % (path, error))
            change(samples)
            descriptor, temp = tempfile.mkstemp(prefix="." + os.path.basename(path) + ".",
                                                suffix=".tmp", dir=folder)
            try:
                with os.fdopen(descriptor, "w") as file:
                    file.write(render(samples))
                    file.flush()
                    os.fchmod(file.fileno(), FILE_MODE)
                    os.fsync(file.fileno())
                os.replace(temp, path)
                temp = None
            finally:
                if temp is not None:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(temp)
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
