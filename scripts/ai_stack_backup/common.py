"""Constants, the error type, naming rules, atomic archive files, signals and progress.

Everything else in the package builds on this module; it imports nothing of ours.
"""

import calendar
import contextlib
import errno
import fcntl
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import time

# --- constants --------------------------------------------------------------

DEFAULT_BACKUP_DIR = "/srv/ai-stack/backups"
DEFAULT_HELPER_IMAGE = "alpine:3.20"

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds the lock, try again later
EXIT_SIGNAL_BASE = 128  # killed by signal N exits 128 + N

TIMESTAMP_FORMAT = "%Y%m%dT%H%M%SZ"
ARCHIVE_SUFFIX = ".tar.gz"
# <source>__<YYYYMMDDTHHMMSSZ>.tar.gz; the source may itself contain "__".
ARCHIVE_NAME_PATTERN = re.compile(r"(?P<source>.+)__(?P<timestamp>\d{8}T\d{6}Z)\.tar\.gz")

# Every file or folder this tool leaves in a backup folder while it works starts
# with this prefix, so a later run can recognise and remove what a killed run left.
WORK_PREFIX = ".ai_stack_backup-"
TEMP_SUFFIX = ".part"  # never ".tar.gz": a temp file must not look like an archive
LOCK_NAME = WORK_PREFIX + "lock"

FOLDER_MODE = 0o700


# --- errors -----------------------------------------------------------------

class BackupError(Exception):
    """An expected failure: the message names the thing and the cause.

    ``legacy`` marks the few messages the old shell scripts printed verbatim
    (``ERROR: path not found: …``); they keep that exact text on stderr.
    """

    exit_code = EXIT_FAILED

    def __init__(self, message, legacy=False):
        super().__init__(message)
        self.legacy = legacy


class ArchiveError(BackupError):
    """An archive is damaged, truncated or breaks a safety rule; it is refused as a whole."""


class Interrupted(BaseException):
    """SIGTERM or SIGINT arrived; unwinds like KeyboardInterrupt so cleanups run."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- messages ---------------------------------------------------------------

def log(message):
    """Write one log line to stderr (journald reads it)."""
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def warn(message):
    log("WARNING: " + message)


def say(stream, line):
    """Write one of the contract's status lines (``OK``, ``Output: …``) to ``stream``."""
    stream.write(line + "\n")
    stream.flush()


def human_size(size):
    """Give ``size`` bytes as a short human-readable string (``12.3 MiB``)."""
    if size < 1024:
        return "%d B" % size
    value = size / 1024.0
    for unit in ("KiB", "MiB", "GiB"):
        if value < 1024:
            return "%.1f %s" % (value, unit)
        value /= 1024
    return "%.1f TiB" % value


def describe_os_error(error):
    """Give an OSError's cause in words; a full disk is said plainly."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (%s)" % os.strerror(error.errno)
    return error.strerror or str(error)


class BackupResult:
    """What one backup produced: source name, archive path (``-``: stdout), size, members, time."""

    def __init__(self, source, path, size, members, seconds):
        self.source, self.path, self.size, self.members, self.seconds = \
            source, path, size, members, seconds


# --- names ------------------------------------------------------------------

def utc_timestamp(when=None):
    """Give the archive timestamp for ``when`` (seconds since the epoch; default now)."""
    return time.strftime(TIMESTAMP_FORMAT, time.gmtime(time.time() if when is None else when))


def parse_timestamp(text):
    """Give the epoch seconds of a ``YYYYMMDDTHHMMSSZ`` timestamp; raises ValueError."""
    return calendar.timegm(time.strptime(text, TIMESTAMP_FORMAT))


def safe_name(path):
    """Give the old scripts' archive name for a host path.

    One leading ``/`` is removed and every character outside ``A-Za-z0-9._-``
    becomes ``_``: ``/home/wasti/x y`` gives ``home_wasti_x_y``.
    """
    if path.startswith("/"):
        path = path[1:]
    return re.sub(r"[^A-Za-z0-9._-]", "_", path)


def archive_name(source, timestamp):
    return "%s__%s%s" % (source, timestamp, ARCHIVE_SUFFIX)


def parse_archive_name(name):
    """Give ``(source, timestamp)`` when ``name`` is exactly one of our archive names, else None."""
    match = ARCHIVE_NAME_PATTERN.fullmatch(name)
    if not match:
        return None
    try:
        parse_timestamp(match.group("timestamp"))
    except ValueError:  # 20261399T999999Z matches the pattern but is no time
        return None
    return match.group("source"), match.group("timestamp")


# --- folders and atomic files -----------------------------------------------

def ensure_backup_dir(path, enforce_mode=False):
    """Create the backup folder with mode 0700 when missing; give its path.

    With ``enforce_mode`` an existing folder is set to 0700 as well (backup_all
    does this on every run, as the old script did). Raises BackupError.
    """
    try:
        os.makedirs(path, mode=FOLDER_MODE)
        os.chmod(path, FOLDER_MODE)  # makedirs' mode is filtered by the umask
    except FileExistsError:
        if not os.path.isdir(path):
            raise BackupError("backup folder %s exists but is not a folder" % path)
        if enforce_mode:
            try:
                os.chmod(path, FOLDER_MODE)
            except OSError as error:
                raise BackupError("cannot set mode 0700 on backup folder %s: %s"
                                  % (path, describe_os_error(error)))
    except OSError as error:
        raise BackupError("cannot create backup folder %s: %s" % (path, describe_os_error(error)))
    return path


def fsync_directory(path):
    """Make a rename or link inside ``path`` durable."""
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


class AtomicArchive:
    """A temp file in the destination folder that is published under its final name.

    The temp file is mode 0600 (mkstemp), named ``.ai_stack_backup-….part`` and
    held with a shared flock so that a cleanup in another process can tell it is
    in use. ``publish()`` fsyncs, links it to the final name (which fails rather
    than overwrite an existing file) and fsyncs the folder; ``close()`` always
    removes the temp name. Use as a context manager.
    """

    def __init__(self, final_path):
        self.final_path = final_path
        self.folder = os.path.dirname(os.path.abspath(final_path))
        self.published = False
        if os.path.lexists(final_path):
            raise BackupError("%s already exists; not overwriting it" % final_path)
        try:
            descriptor, self.temp_path = tempfile.mkstemp(
                prefix=WORK_PREFIX, suffix=TEMP_SUFFIX, dir=self.folder)
        except OSError as error:
            raise BackupError("cannot create a file in %s: %s"
                              % (self.folder, describe_os_error(error)))
        fcntl.flock(descriptor, fcntl.LOCK_SH)
        self.file = os.fdopen(descriptor, "wb", buffering=0)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def publish(self):
        """Make the archive durable and visible under its final name; raises BackupError."""
        try:
            os.fsync(self.file.fileno())
        except OSError as error:
            raise BackupError("cannot write %s: %s" % (self.final_path, describe_os_error(error)))
        try:
            os.link(self.temp_path, self.final_path)
        except FileExistsError:
            raise BackupError("%s already exists; not overwriting it" % self.final_path)
        except OSError as error:
            if error.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS):
                raise BackupError("cannot publish %s: %s"
                                  % (self.final_path, describe_os_error(error)))
            # Filesystems without hard links: rename, after a last existence check.
            if os.path.lexists(self.final_path):
                raise BackupError("%s already exists; not overwriting it" % self.final_path)
            os.rename(self.temp_path, self.final_path)
        self.published = True
        fsync_directory(self.folder)

    def close(self):
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.temp_path)


def remove_stale_work_files(folder):
    """Remove what killed runs left in ``folder``; give the removed paths.

    Only entries named ``.ai_stack_backup-*`` (temp archives, transfer folders)
    that no live process holds a lock on are removed. The lock file stays.
    """
    removed = []
    for name in sorted(os.listdir(folder)):
        if not name.startswith(WORK_PREFIX) or name == LOCK_NAME:
            continue
        path = os.path.join(folder, name)
        try:
            descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode) and \
                    not stat.S_ISDIR(os.fstat(descriptor).st_mode):
                continue
            try:
                fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a running backup holds it
            if os.path.isdir(path):
                shutil.rmtree(path)
            else:
                os.unlink(path)
            removed.append(path)
        finally:
            os.close(descriptor)
    return removed


class BatchedWriter:
    """Gathers small writes into batches for ``write``; big pieces go straight through.

    Tar streams are mostly 512-byte headers and small files: one call per
    batch instead of three per member. ``count`` is every byte written so far.
    """

    BATCH = 256 * 1024

    def __init__(self, write):
        self._write = write
        self._batch = bytearray()
        self.count = 0

    def write(self, data):
        self.count += len(data)
        if len(data) >= self.BATCH:
            self.flush()
            self._write(data)
            return
        self._batch += data
        if len(self._batch) >= self.BATCH:
            self.flush()

    def flush(self):
        if self._batch:
            batch, self._batch = self._batch, bytearray()
            self._write(batch)


# --- signals ----------------------------------------------------------------

@contextlib.contextmanager
def stop_signals_raise():
    """Turn the first SIGTERM/SIGINT into ``Interrupted`` so every cleanup runs.

    Later signals are only logged: a second Ctrl-C must not cut short the
    cleanup (restarting stopped containers, rolling back a restore).
    """
    received = []

    def handler(signum, frame):
        if received:
            log("%s received again; still cleaning up" % signal.Signals(signum).name)
            return
        received.append(signum)
        raise Interrupted(signum)

    previous = {}
    for signum in (signal.SIGTERM, signal.SIGINT):
        previous[signum] = signal.signal(signum, handler)
    try:
        yield
    finally:
        for signum, old_handler in previous.items():
            signal.signal(signum, old_handler)


# --- progress ---------------------------------------------------------------

class Progress:
    """One updating status line on a terminal; silent anywhere else.

    Shows bytes done, rate and elapsed time, plus percentage and ETA when the
    total is known. Nothing is written unless stderr is a terminal.
    """

    INTERVAL = 0.25

    def __init__(self, label, total=None, enabled=True, stream=None):
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.label = label
        self.total = total
        self.done = 0
        self.started = time.monotonic()
        self.last_shown = 0.0
        self.width = 0

    def advance(self, count):
        self.done += count
        if self.enabled:
            now = time.monotonic()
            if now - self.last_shown >= self.INTERVAL:
                self.last_shown = now
                self._show(now)

    def _show(self, now):
        elapsed = max(now - self.started, 1e-6)
        rate = self.done / elapsed
        text = "%s: %s, %s/s, %ds" % (self.label, human_size(self.done), human_size(rate), elapsed)
        if self.total:
            fraction = min(self.done / self.total, 1.0)
            text += ", %d%%" % (fraction * 100)
            if rate > 0 and fraction < 1.0:
                text += ", ETA %ds" % ((self.total - self.done) / rate)
        self.width = max(self.width, len(text))
        self.stream.write("\r" + text.ljust(self.width))
        self.stream.flush()

    def finish(self):
        if self.enabled and self.width:
            self.stream.write("\r" + " " * self.width + "\r")
            self.stream.flush()
