"""The helper protocol: how a tar stream crosses between this process and a helper container.

The helper (busybox ``sh`` and ``tar`` in the helper image) mounts the volume
at ``/volume`` and a private transfer folder at ``/transfer``. A FIFO there is
several times faster than ``docker run`` stdout, and the daemon sees the
folder even when the service runs with ``PrivateTmp=yes``.

The transfer folder (``.ai_stack_backup-transfer-…``, 0700, flocked while in use):

=============  ==============================================================
``stream``     FIFO. Backup: the helper's tar writes the volume into it.
               Restore: the checked stream, when it is not staged.
``plain.tar``  Restore: every checked member re-emitted in one plain format,
               staged when the disk has room (then ``stream`` is unused).
``folders.tar``  Restore: the folder headers only, extracted last.
``symlinks``   Restore: ``uid NUL gid NUL mtime NUL path NUL`` per symlink.
``complete``   Restore: created only after the whole archive, gzip trailer
               included, checked out.
``listing``    Backup with skip-if-unchanged: one ``stat`` line per entry,
               published (renamed) once complete; ``listing-started`` holds
               the helper's clock (seconds) when it began, ``listing-errors``
               what ``stat`` said (anything there: the listing is unusable).
``probe``      Restore into an existing volume: its free and used space,
               whether it is empty, its root folder; published once complete.
``go``         FIFO. The word that tells a listing helper what to tar (its
               plan, everything, or nothing).
``step``       FIFO. The word that starts a probed volume's next step: its
               safety copy, or the restore.
``saved``      The safety copy's step ended: its exit status, published once
               written; ``saved-errors`` holds what the step said on stderr.
=============  ==============================================================

The restore script, step by step (into an existing volume, the same helper
first publishes ``probe`` and waits on ``step``; told ``save``, it lists and
tars the volume for the safety copy as a backup's helper does, publishes
``saved`` and waits again):

1. fd 4 opens ``plain.tar`` if it exists, else the FIFO ``stream``;
2. the volume is emptied, hidden entries included, up to sixteen of its top
   folders at once (never names through xargs -P: see ``WIPE_SCRIPT``); or,
   told ``aside`` where there is room for both, its contents are moved into one
   new folder there that is removed in the background (``SET_ASIDE_SCRIPT``);
3. tar extracts fd 4 with numeric owners;
4. without ``complete`` the stream ended early: exit 4 (the volume is then
   rolled back by the caller);
5. symlink owners and mtimes are set, four fields per ``xargs -n 4`` call
   (busybox tar skips them), and the background removal must have succeeded;
6. ``folders.tar`` is extracted: busybox sets a folder's mtime when it
   creates it, and creates hard links and absolute symlinks after the whole
   stream, which would change the folders again.
"""

import contextlib
import errno
import fcntl
import os
import re
import select
import shutil
import tempfile
import time

from . import docker
from .docker import Helper
from .errors import ArchiveError, BackupError, DockerError, NoRoom, describe_os_error
from .files import WORK_PREFIX, BatchedWriter, pipe_writer
from .tarstream import DIRECTORY, END_OF_ARCHIVE, FILE, SYMLINK, member_header, padding

STREAM, PLAIN, FOLDERS, SYMLINKS, COMPLETE = \
    "stream", "plain.tar", "folders.tar", "symlinks", "complete"
PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux; fcntl has the name from 3.10
SPOOL_CHECK_EVERY = 64 << 20
SPOOL_RESERVE_MIN = 1 << 30  # staging never leaves less free space than this...
SPOOL_RESERVE_SHARE = 0.05  # ...or than this share of the filesystem
ENDED_EARLY = 4  # the restore script's exit code when ``complete`` is missing


def _reserve(size):
    """The bytes to keep free on a filesystem of ``size`` bytes."""
    return max(SPOOL_RESERVE_MIN, size * SPOOL_RESERVE_SHARE)


BACKUP_SCRIPT = "tar -C /volume -cf /transfer/stream ."
# The planned backup (``blocked``): first a listing with enough of every entry that any write
# changes its line (ctime first: it cannot be set back), then, once the plan is in, a tar of
# exactly the entries the plan names, in its order. busybox tar has no ``-T`` (Debian's build),
# so the names go as arguments through ``xargs -0``: one tar stream per batch, read as one
# (``TarReader(concatenated=True)``); xargs says 123 when a tar ended with 1 (a file gone).
# ``/bin/sh`` by path: busybox xargs runs a bare ``sh`` as its own applet, past any wrapper.
# Names with a line break cannot be told apart in the listing: the plan is then a full tar.
LISTING, LISTING_STARTED, LISTING_ERRORS, GO, PLAN = \
    "listing", "listing-started", "listing-errors", "go", "plan"
LISTING_FORMAT = "%Z %i %h %s %f %u %g %Y %n"
# A restore stopped by SIGKILL or a reboot while the old contents were set aside
# (``SET_ASIDE_SCRIPT``) leaves their folder in the volume; a backup's helper names any such
# folder at the top in the file SET_ASIDE, so that the backup can say it holds one.
SET_ASIDE_PREFIX = ".ai_stack_backup-old-"
SET_ASIDE = "set-aside"
_SET_ASIDE_NAME = re.compile(re.escape(SET_ASIDE_PREFIX.encode()) + rb"[A-Za-z0-9]{6}")
# A name with a line break could forge a listing line. The listing's one find gives such
# an entry no line of its own but this one, which no stat line can be, and one is enough
# to distrust the whole listing (a second find only for such names cost a third more).
ODD_NAME_LINE = b"?"
# An entry gone between readdir and stat is only a line on stderr (and exit 1), as on any
# busy volume; a failure that says nothing is written down, so it is never taken for one.
# The listing runs in the background: a first backup (``full`` told at once) tars the volume
# while it is listed; a plan waits for the whole listing anyway. The start time is taken
# before either reads anything (see ``blocked.assemble_while_listing``), and the helper ends only
# once the listing is complete. While that job runs, the shell itself opens no FIFO: its
# end would interrupt a blocked open(), which busybox's redirections do not retry (and ash
# opens a command's redirections before it forks), so subshells open them.
PLANNED_BACKUP_SCRIPT = """cd /volume
for left in %s*; do
  if [ -d "$left" ] && [ ! -L "$left" ]; then echo "$left"; fi
done > /transfer/%s
date +%%s > /transfer/listing-started
errors=/transfer/listing-errors
{
  find . -name '*
*' -exec echo '%s' \\; -o -name '*
*' -o -exec stat -c '%s' {} + > /transfer/listing.part 2> $errors \\
    || [ -s $errors ] || echo "find failed" >> $errors
  mv /transfer/listing.part /transfer/listing
} &
mode=$(cat /transfer/go)
[ "$mode" = stop ] && exit 0
status=0
if [ "$mode" = full ]; then
  (tar -cf - . > /transfer/stream) || status=$?
else
  (xargs -0 -r /bin/sh -c 'tar -cf - --no-recursion "$@"' sh < /transfer/plan \\
    > /transfer/stream) || status=$?
  [ $status = 123 ] && status=1
fi
wait
exit $status""" % (SET_ASIDE_PREFIX, SET_ASIDE, ODD_NAME_LINE.decode(), LISTING_FORMAT)
HELPER_POLL = 0.01  # how often a file the helper publishes is looked for
LISTING_READ = 1 << 16  # how much of a growing listing is read at a time
BACKUP_TO_STDOUT_SCRIPT = "tar -C /volume -cf - ."
# Emptying a volume: up to sixteen ``rm -rf`` at once, one for each folder at its top, and
# then one plain rm for all that is left (files at the top, hidden names), whose failure
# counts. Where every freed block is discarded at once (ext4 mounted with ``discard``, as on
# this project's machines), removing 200,000 files in 200 folders so takes 3.1 s where one
# rm takes 14 s; on an ext4 with a journal 1.5 s against 2.0 s. Names come from the shell's
# own globs, never through xargs: busybox's ``xargs -0 -P`` (1.35, Debian 12's) hands its
# commands pieces of names, ``/`` among them (measured: a few in every 200,000 names), and
# ``rm -rf /`` in the helper empties the transfer folder too, the staged archive with it.
WIPE_SCRIPT = """started=0
for entry in /volume/* /volume/.[!.]* /volume/..?*; do
  if [ -d "$entry" ] && [ ! -L "$entry" ]; then
    rm -rf "$entry" 2>/dev/null &
    started=$((started + 1))
    if [ $started = 16 ]; then wait; started=0; fi
  fi
done
wait
rm -rf /volume/..?* /volume/.[!.]* /volume/*"""
# A drill's scratch volume is read back and then removed: one helper does both, so the
# comparison's joins run while it empties the volume, and one container start less. Only
# tar's status counts: what the wipe leaves goes with the engine's removal of the volume.
READ_BACK_AND_EMPTY_SCRIPT = """status=0
(%s) || status=$?
{ %s; } || true
exit $status""" % (BACKUP_SCRIPT, WIPE_SCRIPT)
# Told ``aside`` (where the volume has room for its old and new contents at once), the
# restore does not wait for the wipe: the old contents are moved into one folder of a fresh
# name at the volume's top (renames, no data moves), which ``rm -rf`` removes while tar
# extracts; both must be done before the folders' owners, modes and mtimes are set, since
# removing that folder changes the top's mtime. The name is unknown to any archive, and
# checked to be gone at the end (a member of that very name would have been removed).
# ``mv -t`` is not in every busybox: the folder goes last, through a shell.
SET_ASIDE_SCRIPT = """old=$(mktemp -d /volume/%sXXXXXX) || exit 1
find /volume -mindepth 1 -maxdepth 1 ! -path "$old" \\
  -exec sh -c 'into=$1; shift; mv -f "$@" "$into"' sh "$old" {} + || {
  echo "cannot move the volume's old contents aside into $old" >&2; exit 1; }
rm -rf "$old" &
remover=$!""" % SET_ASIDE_PREFIX
RESTORE_SCRIPT = """if [ -e /transfer/plain.tar ]; then source=plain.tar; else source=stream; fi
exec 4</transfer/$source
remover=
if [ "$mode" = aside ]; then
%s
else
%s
fi
tar -xf - -C /volume --numeric-owner <&4
[ -e /transfer/complete ] || { echo "the archive stream ended early" >&2; exit %d; }
if [ -s /transfer/symlinks ]; then
  xargs -0 -n 4 sh -c 'chown -h "$0:$1" "$3" && touch -h -d "@$2" "$3"' </transfer/symlinks
fi
if [ -n "$remover" ]; then
  { wait $remover && [ ! -e "$old" ] && [ ! -L "$old" ]; } || {
    echo "cannot remove the volume's old contents in $old" >&2; exit 1; }
fi
tar -xf /transfer/folders.tar -C /volume --numeric-owner""" % (SET_ASIDE_SCRIPT, WIPE_SCRIPT,
                                                               ENDED_EARLY)


class TransferFolder:
    """A private folder (0700) under ``parent`` holding the FIFO ``stream``.

    Held with a shared flock while in use, so a later run can remove it if
    this process is killed.
    """

    def __init__(self, parent):
        try:
            self.path = tempfile.mkdtemp(prefix=WORK_PREFIX + "transfer-", dir=parent)
        except OSError as error:
            raise BackupError("cannot create a transfer folder in %s: %s; set BACKUP_DIR to a "
                              "writable folder the Docker daemon can see"
                              % (parent, describe_os_error(error)))
        self._lock = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._lock, fcntl.LOCK_SH)
        self.fifo = self.file(STREAM)
        os.mkfifo(self.fifo, 0o600)

    def file(self, name):
        return os.path.join(self.path, name)

    def size(self, name):
        """The bytes the file ``name`` holds (0: there is none)."""
        try:
            return os.stat(self.file(name)).st_size
        except FileNotFoundError:
            return 0

    def discard(self, *names):
        for name in names:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.file(name))

    def close(self):
        shutil.rmtree(self.path, ignore_errors=True)
        os.close(self._lock)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def _set_blocking_and_widen(descriptor):
    flags = fcntl.fcntl(descriptor, fcntl.F_GETFL)
    fcntl.fcntl(descriptor, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
    with contextlib.suppress(OSError):  # a larger pipe means fewer, bigger copies
        fcntl.fcntl(descriptor, F_SETPIPE_SZ, PIPE_SIZE)


def _ended_before(helper, what, doing):
    """Give the DockerError of a helper that ended before ``doing``."""
    return DockerError(what, "the helper container ended before %s (exit %d): %s"
                       % (doing, helper.wait(), helper.error_output()))


def _open_fifo_for_reading(fifo, helper, what):
    """Open the FIFO once the helper has connected; give a blocking descriptor.

    Never hangs on a helper that fails to start: until a writer connects, poll
    reports nothing (Linux), and the helper's exit is checked in between.
    """
    descriptor = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        poller = select.poll()
        poller.register(descriptor, select.POLLIN | select.POLLHUP)
        while not poller.poll(100):
            if not helper.running():
                raise _ended_before(helper, what, "sending data")
        _set_blocking_and_widen(descriptor)
    except BaseException:
        os.close(descriptor)
        raise
    return descriptor


def _open_fifo_for_writing(fifo, helper, what):
    """Open the FIFO once the helper reads it; give a blocking descriptor."""
    while True:
        try:
            descriptor = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as error:
            if error.errno != errno.ENXIO:  # ENXIO: no reader yet
                raise
        if not helper.running():
            raise _ended_before(helper, what, "reading data")
        time.sleep(0.02)
    _set_blocking_and_widen(descriptor)
    return descriptor


@contextlib.contextmanager
def volume_tar_stream(image, volume, work_folder, what):
    """Start a helper that writes the volume as tar; give ``(descriptor, helper)``.

    With ``work_folder`` the stream comes through a FIFO in a transfer folder
    there; without (no backup folder: the archive goes to stdout), through the
    helper's stdout. The volume is mounted read-only.
    """
    if work_folder is None:
        with Helper(image, volume, BACKUP_TO_STDOUT_SCRIPT, read_only=True,
                    capture_stdout=True) as helper:
            yield helper.stdout_fd, helper
        return
    with _fifo_tar_stream(image, volume, work_folder, what, BACKUP_SCRIPT, True) as streaming:
        yield streaming


def read_back_and_empty(image, volume, work_folder, what):
    """Like ``volume_tar_stream`` through a FIFO, for a volume that is removed next: once the
    stream has ended, the helper empties the volume (``READ_BACK_AND_EMPTY_SCRIPT``) and
    then exits with tar's status."""
    return _fifo_tar_stream(image, volume, work_folder, what, READ_BACK_AND_EMPTY_SCRIPT, False)


@contextlib.contextmanager
def _fifo_tar_stream(image, volume, work_folder, what, script, read_only):
    with TransferFolder(work_folder) as transfer, \
            Helper(image, volume, script, read_only=read_only,
                   transfer_path=transfer.path) as helper:
        descriptor = _open_fifo_for_reading(transfer.fifo, helper, what)
        try:
            yield descriptor, helper
        finally:
            os.close(descriptor)


def _wait_for_file(folder, name, helper, what, doing):
    """Wait until the helper has published ``name`` in the transfer folder; raises
    DockerError if it ended without it."""
    while not os.path.exists(folder.file(name)):
        if not helper.running():
            if os.path.exists(folder.file(name)):
                return
            raise _ended_before(helper, what, doing)
        time.sleep(HELPER_POLL)


def _tell(folder, helper, what, mode, fifo=GO):
    """Hand a helper waiting on the FIFO ``fifo`` its next step (one word)."""
    descriptor = _open_fifo_for_writing(folder.file(fifo), helper, what)
    try:
        os.write(descriptor, mode.encode() + b"\n")
    finally:
        os.close(descriptor)


class PlannedStream:
    """A helper that lists the volume, waits for a plan, then writes the tar the plan asks
    for (``planned_tar_stream``).

    ``wait_for_listing()`` gives what the listing left; ``send(mode, names)``
    hands the helper the plan (``plan``: the NUL-separated ``names``;
    ``full``: the whole volume, which may be told before the listing is
    complete; ``stop``: nothing); ``opened()`` then gives ``(descriptor,
    helper)`` of the tar stream.
    """

    def __init__(self, folder, helper, what):
        self.folder, self.helper, self.what = folder, helper, what

    def wait_for_listing(self):
        """Give ``(started, listing path, errors)`` once the listing is complete (``errors``
        non-empty: unusable); raises DockerError if the helper ended without one."""
        _wait_for_file(self.folder, LISTING, self.helper, self.what, "listing the volume")
        found = []
        for name in (LISTING_STARTED, LISTING_ERRORS):
            with open(self.folder.file(name), "rb") as file:
                found.append(file.read())
        return found[0].strip(), self.folder.file(LISTING), found[1]

    def started(self):
        """Give the helper's start of the listing (its first step, before it reads anything)."""
        while True:
            _wait_for_file(self.folder, LISTING_STARTED, self.helper, self.what,
                           "listing the volume")
            with open(self.folder.file(LISTING_STARTED), "rb") as file:
                written = file.read()
            # ``date`` creates the file before it writes its line.
            if written.endswith(b"\n") or not self.helper.running():
                return written.strip()
            time.sleep(HELPER_POLL)

    def listing_as_written(self):
        """Give a ListingAsWritten of this helper's listing (close it after use)."""
        return ListingAsWritten(self)

    def write_plan(self, names):
        """Write the plan's NUL-separated ``names``, for a later ``send("plan")``; the
        helper reads them only then, so they may be written while it still lists."""
        with open(self.folder.file(PLAN), "wb") as file:
            writer = BatchedWriter(file.write)
            for name in names:
                writer.write(name + b"\0")
            writer.flush()

    def send(self, mode, names=None):
        """Tell the helper ``mode``; for ``plan``, ``names`` are written first (None: they
        were, by ``write_plan``)."""
        if names is not None:
            self.write_plan(names)
        _tell(self.folder, self.helper, self.what, mode)

    def set_aside(self):
        """Give the names of the folders an interrupted restore left at the volume's top
        (``SET_ASIDE_PREFIX`` and mktemp's six letters), as the helper found them."""
        try:
            with open(self.folder.file(SET_ASIDE), "rb") as file:
                lines = file.read(1 << 16).splitlines()
        except FileNotFoundError:  # a helper that ended before it looked
            return []
        return [line.decode("ascii") for line in lines if _SET_ASIDE_NAME.fullmatch(line)]

    @contextlib.contextmanager
    def opened(self):
        descriptor = _open_fifo_for_reading(self.folder.fifo, self.helper, self.what)
        try:
            yield descriptor, self.helper
        finally:
            os.close(descriptor)


class ListingAsWritten:
    """A PlannedStream's listing read while the helper writes it: ``read()`` gives its next
    bytes, waiting for them, and b"" once it is complete; raises DockerError if the helper
    ended without completing it."""

    def __init__(self, planned):
        self._planned = planned
        self._file = None
        self._complete = False

    def _path(self, name):
        return self._planned.folder.file(name)

    def read(self):
        while True:
            if self._file is None:
                for name in (LISTING + ".part", LISTING):  # renamed once complete
                    with contextlib.suppress(FileNotFoundError):
                        self._file = open(self._path(name), "rb")
                        break
            if self._file is not None:
                data = self._file.read(LISTING_READ)
                if data or self._complete:
                    return data
                # Seen renamed: whatever is read after that is the rest of it.
                self._complete = os.path.exists(self._path(LISTING))
                if self._complete:
                    continue
            helper = self._planned.helper
            if not helper.running() and not os.path.exists(self._path(LISTING)):
                raise _ended_before(helper, self._planned.what, "listing the volume")
            time.sleep(HELPER_POLL)

    def close(self):
        if self._file is not None:
            self._file.close()


@contextlib.contextmanager
def planned_tar_stream(image, volume, work_folder, what):
    """Start a helper that lists the volume, then tars what it is told; give a
    PlannedStream."""
    with TransferFolder(work_folder) as folder:
        os.mkfifo(folder.file(GO), 0o600)
        with Helper(image, volume, PLANNED_BACKUP_SCRIPT, read_only=True,
                    transfer_path=folder.path) as helper:
            yield PlannedStream(folder, helper, what)


# Free and used space, whether anything is in the volume, and its root folder's owner, mode
# and mtime: what a restore needs to know of an existing volume before it changes anything.
PROBE_SCRIPT = """df -P -k /volume | tail -n 1
du -s -k /volume
ls -A /volume | head -n 1 | wc -l
stat -c '%u %g %a %Y' /volume
df -P -i /volume | tail -n 1"""
BLOCK = 4096  # what one member takes at least on the usual filesystems


class VolumeProbe:
    """An existing volume as a restore finds it: ``free`` and ``held`` bytes, ``empty``,
    ``root`` (uid, gid, mode, mtime) of its root folder, the ``size`` of its filesystem in
    bytes, and its ``inodes`` as ``(free, total)`` (total 0: made as needed, as btrfs
    says; None: not known)."""

    def __init__(self, free, held, empty, root, size=0, inodes=None):
        self.free, self.held, self.empty, self.root, self.size = free, held, empty, root, size
        self.inodes = inodes


# A restore of an existing volume runs one helper, not a probe, a safety copy's helper and
# then a restore: it publishes the probe, then waits on ``step`` while the archive is
# checked. ``save`` runs the safety copy's listing and tar (``PLANNED_BACKUP_SCRIPT``, told
# on ``go`` what to tar) with its stderr and exit status in files of their own, and waits
# again; ``go`` restores; anything else (or the FIFO closed unwritten) ends it. The step
# runs as a background job only so that ``set -e`` holds inside it (it would not on the
# left of ``||``). It waits on ``step``, not ``go``: a word for the step's ``go`` must never
# reach a read of the helper's own that has not closed the FIFO yet.
PROBED_RESTORE_SCRIPT = """{
%s
} > /transfer/probe.part
mv /transfer/probe.part /transfer/probe
read mode < /transfer/step
while [ "$mode" = save ]; do
  (%s) 2> /transfer/saved-errors &
  status=0
  wait $! || status=$?
  echo $status > /transfer/saved.part
  mv /transfer/saved.part /transfer/saved
  read mode < /transfer/step
done
[ "$mode" = go ] || [ "$mode" = aside ] || exit 0
%s""" % (PROBE_SCRIPT, PLANNED_BACKUP_SCRIPT, RESTORE_SCRIPT)
PROBE, STEP, SAVED, SAVED_ERRORS = "probe", "step", "saved", "saved-errors"


@contextlib.contextmanager
def probed_restore(image, volume, folder):
    """Start the helper that restores an existing volume through the transfer ``folder``;
    give ``(VolumeProbe, helper)`` once it has looked at the volume.

    The helper then waits for ``planned_step`` (the safety copy) and for
    ``fill_volume(…, waiting=helper)``; leaving the block stops it if it was
    not used. Raises DockerError.
    """
    what = "measuring volume %s" % volume
    os.mkfifo(folder.file(STEP), 0o600)
    with Helper(image, volume, PROBED_RESTORE_SCRIPT, transfer_path=folder.path) as helper:
        _wait_for_file(folder, PROBE, helper, what, "measuring the volume")
        with open(folder.file(PROBE), "rb") as file:
            probe = _read_probe(file.read(), what)
        yield probe, helper


class HelperStep:
    """The safety copy's step of a restore's waiting helper, as a caller of a ``Helper``
    sees one: running, its exit status and its stderr are those of the step alone (the
    files ``saved`` and ``saved-errors``), while the container goes on."""

    def __init__(self, helper, folder):
        self._helper, self._folder = helper, folder

    def _status(self):
        try:
            with open(self._folder.file(SAVED), "rb") as file:
                return int(file.read())
        except FileNotFoundError:
            return None

    def running(self):
        return self._helper.running() and not os.path.exists(self._folder.file(SAVED))

    def wait(self, timeout=None):
        """Wait for the step to end; give its exit status (the container's, if that ended
        within the step; None if ``timeout`` ran out)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            status = self._status()
            if status is not None:
                return status
            if not self._helper.running():
                status = self._status()
                return self._helper.wait() if status is None else status
            if deadline is not None and time.monotonic() >= deadline:
                return None
            time.sleep(HELPER_POLL)

    def _lines(self):
        with contextlib.suppress(FileNotFoundError):
            with open(self._folder.file(SAVED_ERRORS), "rb") as file:
                return [line.decode("utf-8", "replace").rstrip("\n") for line in file]
        return []

    def warnings(self):
        """Give every stderr line of the step, or None when there were too many to keep."""
        lines = self._lines()
        return lines if len(lines) <= docker.STDERR_KEEP_LINES else None

    def error_output(self):
        lines = self._lines()
        if self._status() is None and not self._helper.running():
            return self._helper.error_output()  # the container ended within the step
        return " / ".join(lines[-docker.STDERR_TAIL_LINES:]) or "no error output"

    # A Helper's own, which asks only ``wait`` and ``error_output``: here, the step's.
    failed = docker.Helper.failed


@contextlib.contextmanager
def planned_step(folder, helper, what):
    """Have a restore's helper waiting in ``probed_restore`` list the volume and tar what it
    is told, as ``planned_tar_stream``'s helper does, and wait again afterwards; give the
    PlannedStream.

    A block left by an error before the step ended (say, while the step waits
    to be told what to tar) stops the helper, and so does a step that does not
    end soon after the block: it can then neither hang nor meet a later step's
    files, and what follows (a second try at the copy, the restore) starts
    helpers of its own.
    """
    folder.discard(SAVED, SAVED_ERRORS, LISTING, LISTING + ".part", LISTING_STARTED,
                   LISTING_ERRORS, PLAN)
    if not os.path.exists(folder.file(GO)):
        os.mkfifo(folder.file(GO), 0o600)
    _tell(folder, helper, what, "save", STEP)
    step = HelperStep(helper, folder)
    try:
        yield PlannedStream(folder, step, what)
    except BaseException:
        if step.wait(timeout=0) is None:
            helper.stop()
        raise
    if step.wait(timeout=docker.HELPER_EXIT_GRACE) is None:
        helper.stop()


def _read_probe(output, what):
    lines = output.decode("utf-8", "replace").splitlines()
    try:
        uid, gid, mode, mtime = lines[3].split()
        filesystem = lines[0].split()
        probe = VolumeProbe(int(filesystem[3]) * 1024, int(lines[1].split()[0]) * 1024,
                            lines[2].strip() == "0", (int(uid), int(gid), int(mode, 8),
                                                      int(mtime)), int(filesystem[1]) * 1024)
    except (IndexError, ValueError):
        raise DockerError(what, "unexpected output from the helper: %r" % output[:200])
    # A df without -i (some helper image's) only costs setting the old contents aside.
    with contextlib.suppress(IndexError, ValueError):
        inodes = lines[4].split()
        probe.inodes = (int(inodes[3]), int(inodes[1]))
    return probe


def space_check(probe, volume, summary, staged_bytes=0):
    """Refuse (NoRoom) unless the volume's filesystem can hold what the archive will write;
    give the bytes to spare were it written beside what the volume holds now (negative:
    no room for both, in bytes or in inodes). With room for both, the old contents may be
    set aside and removed while the archive is extracted (``RESTORE_SCRIPT``).

    What the volume holds now is counted as free: it goes before extraction.
    The need is each member's data plus one block, so a tree of small files is
    not underestimated. Sparse files are written out in full by tar. Beside the old
    contents, the staging's reserve stays free (of bytes, and a share of the inodes),
    and ``staged_bytes`` (the staged archive, which may be on the same filesystem)
    count as taken.
    """
    free, held = probe.free, probe.held
    need = summary.data_bytes + summary.members * BLOCK
    if need > free + held:
        raise NoRoom("volume %s has room for about %d MiB (%d MiB free and %d MiB it holds now), "
                     "but the archive needs about %d MiB; nothing was changed"
                     % (volume, (free + held) >> 20, free >> 20, held >> 20, need >> 20))
    if probe.inodes is None:
        return -1
    free_inodes, inodes = probe.inodes
    if inodes and summary.members > free_inodes - inodes * SPOOL_RESERVE_SHARE:
        return -1
    return free - need - staged_bytes - _reserve(probe.size)


def stream_chunks(descriptor, progress=None):
    """Yield the tar stream from a helper (``volume_tar_stream``) in chunks until its end."""
    while True:
        chunk = os.read(descriptor, 1 << 20)
        if not chunk:
            return
        if progress is not None:
            progress.advance(len(chunk))
        yield chunk


def remove_volume(image, volume, reporter, emptied=False):
    """Remove ``volume``; unless a helper already ``emptied`` it, a helper empties it first
    (``WIPE_SCRIPT``: several times faster than the engine's removal of many files). Raises
    BackupError if it cannot be removed."""
    if not emptied:
        try:
            wipe_volume(image, volume, reporter)
        except BackupError:
            pass  # the engine's removal below still removes everything, or says why not
    docker.remove_volume(volume)


def wipe_volume(image, volume, reporter, root=None):
    """Empty the volume; with ``root`` (uid, gid, mode, mtime) set its root folder so too."""
    script = WIPE_SCRIPT
    if root is not None:
        script += "\nchown %d:%d /volume\nchmod %o /volume\ntouch -d @%d /volume" % root
    with Helper(image, volume, script) as helper:
        helper.finish("emptying volume %s" % volume, reporter)


# --- restore: staging the checked stream, then the helper -------------------------

class StagingFull(Exception):
    """Staging the uncompressed archive would eat into the disk's reserve."""


class _StagingWriter:
    """Writes ``plain.tar``, stopping well before the disk is full.

    The free space is checked every 64 MiB; when less than the reserve (5% of
    the filesystem, at least 1 GiB) would be left, StagingFull is raised.
    """

    def __init__(self, path):
        self.file = open(path, "wb", buffering=BatchedWriter.BATCH)
        self.unchecked = 0
        self._check()

    def _check(self):
        status = os.fstatvfs(self.file.fileno())
        if status.f_bavail * status.f_frsize - SPOOL_CHECK_EVERY < \
                _reserve(status.f_blocks * status.f_frsize):
            raise StagingFull()

    def write(self, data):
        try:
            self.file.write(data)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StagingFull()
            raise
        self.unchecked += len(data)
        if self.unchecked >= SPOOL_CHECK_EVERY:
            self.unchecked = 0
            self._check()

    def flush(self):
        self.file.flush()

    def close(self):
        self.file.close()


def emit_checked_stream(archive, output, transfer, progress=None, shape=None, seen=None):
    """Re-emit the archive's checked members as plain tar into ``output``; give an ArchiveSummary.

    Fills ``folders.tar`` and ``symlinks`` on the way and creates ``complete``
    only after the whole archive checked out. ``seen`` (if given) is shown
    every member (``member(member)``), its data (``piece(data)``), and the end
    (``close()``). Raises ArchiveError.
    """
    check = archive.check(progress, shape)
    with open(transfer.file(FOLDERS), "wb") as folders, \
            open(transfer.file(SYMLINKS), "wb") as symlinks:
        for member in check.members:
            header = member_header(member)
            output.write(header)
            if seen is not None:
                seen.member(member)
            if member.kind == FILE:
                for piece in check.data():
                    output.write(piece)
                    if seen is not None:
                        seen.piece(piece)
                output.write(padding(member.size))
            elif member.kind == DIRECTORY:
                folders.write(header)
            elif member.kind == SYMLINK:
                symlinks.write(b"%d\0%d\0%d\0/volume/%s\0"
                               % (member.uid, member.gid, member.mtime, member.path))
        folders.write(END_OF_ARCHIVE)
    if seen is not None:
        seen.close()
    output.flush()
    with open(transfer.file(COMPLETE), "wb"):
        pass
    try:
        output.write(END_OF_ARCHIVE)
        output.flush()
    except BrokenPipeError:
        pass  # tar may stop reading at the first zero block; its exit code decides
    return check.summary()


def stage(archive, transfer, progress, shape=None):
    """Check the whole archive, staging it as ``plain.tar``; give ``(ArchiveSummary, staged)``.

    When the disk has no room for the staged copy, the archive is only
    checked here (``staged`` False) and ``fill_volume`` streams it again.
    Raises ArchiveError for a damaged or hostile archive.
    """
    try:
        writer = _StagingWriter(transfer.file(PLAIN))
        try:
            return emit_checked_stream(archive, writer, transfer, progress, shape), True
        finally:
            writer.close()
    except StagingFull:
        transfer.discard(PLAIN, FOLDERS, SYMLINKS, COMPLETE)
    progress.done = 0
    return archive.check(progress, shape).run(), False


def fill_volume(image, volume, archive, transfer, staged, reporter, checked_before=True,
                shape=None, waiting=None, seen=None, aside=False):
    """Empty the volume and extract the checked archive (staged, or streamed) with the
    helper ``waiting`` in ``probed_restore`` (else with one of its own); a streamed archive
    is shown to ``seen`` as ``emit_checked_stream`` says. With ``aside`` (the volume has
    room, ``space_check``), the old contents are removed while the archive is extracted.

    Streamed after a checking pass (``checked_before``), the second pass must
    be exactly what was checked, or ArchiveError is raised (with
    ``changed-during-restore``). Streamed in one pass (into an empty volume),
    each member is checked before it is sent and the helper sees ``complete``
    only after the whole archive checked out; an ArchiveError then comes from
    here. Raises DockerError if the helper fails; the volume may then be
    partly filled, which the caller rolls back.
    """
    what = "restoring volume %s" % volume
    # Left in any way, the helper is stopped: a rollback must never meet it still extracting.
    mode = "aside" if aside else "go"
    with waiting or Helper(image, volume, "mode=%s\n%s" % (mode, RESTORE_SCRIPT),
                           transfer_path=transfer.path) as helper:
        if waiting is not None:
            _tell(transfer, helper, what, mode, STEP)
        if not staged:
            with reporter.progress("Restoring %s" % volume, total=archive.size) as progress:
                descriptor = _open_fifo_for_writing(transfer.fifo, helper, what)
                try:
                    sent = emit_checked_stream(archive, pipe_writer(descriptor), transfer,
                                               progress, shape, seen)
                except BrokenPipeError:
                    raise helper.failed(what)
                finally:
                    os.close(descriptor)
        helper.finish(what, reporter)
    if not staged and checked_before and not archive.unchanged(sent):
        raise ArchiveError("the archive %s changed while it was being restored" % archive.name,
                           "changed-during-restore")
