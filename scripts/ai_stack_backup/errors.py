"""Exit codes and the exception types: one base, one subclass per failure code tells apart.

Code decides by type (and ``ArchiveError.rule``), never by message text. The
message always names the thing and the cause.
"""

import errno
import os
import signal

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_LOCKED = 75  # EX_TEMPFAIL: another run holds the lock, try again later
EXIT_SIGNAL_BASE = 128  # stopped by signal N exits 128 + N

EXIT_STATUS_HELP = """exit status:
  0    success
  1    failed (the reason is on stderr; nothing half-written is left)
  2    usage error (bad or missing arguments)
  75   locked: another run holds the lock; try again later
  128+N  stopped by signal N (SIGHUP 129, SIGINT 130, SIGTERM 143) after cleaning up"""


class BackupError(Exception):
    """An expected failure: the message names the thing and the cause; exits 1."""

    exit_code = EXIT_FAILED
    # The few messages the old shell scripts printed verbatim as ``ERROR: …``.
    legacy = False


class NotFound(BackupError):
    """The path or archive named on the command line does not exist (``ERROR: … not found``)."""

    legacy = True


class ConfigError(BackupError):
    """A setting in the environment has a value the tool cannot use."""


class ArchiveError(BackupError):
    """An archive is damaged, truncated or breaks a safety rule; it is refused as a whole.

    ``rule`` names what fired, one short word for each rule and structural
    check (``through-symlink``, ``truncated``, ``gzip-crc``, …).
    """

    def __init__(self, message, rule):
        super().__init__(message)
        self.rule = rule


class ArchiveRefused(ArchiveError):
    """A restore or verify refused an archive; the message says what was left unchanged."""


class ArchiveExists(BackupError):
    """An archive of that name exists already; it is never overwritten."""


class DockerError(BackupError):
    """A docker command failed; ``detail`` is the tail of its stderr (or what went wrong)."""

    def __init__(self, what, detail):
        super().__init__("%s: %s" % (what, detail))
        self.detail = detail


class EngineUnavailable(DockerError):
    """The docker command cannot be run at all."""


class VolumeMissing(BackupError):
    """The volume to back up does not exist (nothing is created)."""


class ContainersInTheWay(BackupError):
    """Running containers stand in the way; ``containers`` names them."""

    def __init__(self, message, containers):
        super().__init__(message)
        self.containers = containers


class VolumeInUse(ContainersInTheWay):
    """Running containers mount the volume a restore would replace."""


class RolledBack(BackupError):
    """A restore failed after it began changing the target; the message says how it was left."""


class ContainerWouldVanish(ContainersInTheWay):
    """A container that would have to stop was started with ``--rm``: stopping removes it."""


class Unrestorable(BackupError):
    """A source holds something the restore rules refuse; no archive of it is published."""


class NoRoom(BackupError):
    """The volume's filesystem cannot hold what a restore would write; nothing changed."""


class DatabaseDamaged(BackupError):
    """An SQLite database inside an archive failed ``PRAGMA integrity_check``."""


class Locked(BackupError):
    """Another run holds the lock; exits 75 so a timer can simply try again."""

    exit_code = EXIT_LOCKED


class Interrupted(BaseException):
    """SIGTERM, SIGINT or SIGHUP arrived; unwinds like KeyboardInterrupt so cleanups run."""

    def __init__(self, signum):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def describe_os_error(error):
    """Give an OSError's cause in words; a full disk is said plainly."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "the disk is full (%s)" % os.strerror(error.errno)
    return error.strerror or str(error)
