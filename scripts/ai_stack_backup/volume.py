"""Backing up and restoring one Docker named volume.

Backup: busybox tar in the helper writes the volume (members ``./…``, as the
old script did) into a FIFO; this process checks the tar stream as it passes,
gzips it on every core and publishes the archive atomically, owned by the
invoking user with mode 0600.

Restore: the whole archive is read and checked first, and as it is checked
its members are re-emitted in one plain format into ``plain.tar`` in a
private transfer folder (when the disk has no room for that, the archive is
checked and then streamed to the helper in a second, equally checked pass).
So the helper's busybox tar extracts exactly what was checked. Then, unless
asked not to, the volume's current contents are saved as an ordinary archive
(the safety backup); the helper empties the volume and extracts. Folder
entries go into a second small tar extracted last (busybox sets a folder's
mtime before its contents change it), and symlink owners and mtimes are set
afterwards (busybox skips them). If anything fails after the volume was
emptied, the safety backup is restored."""

import contextlib
import errno
import os
import sys
import time

from . import docker
from .archive import ArchiveSummary, checked_members, scan_archive, spooled_stdin
from .common import DEFAULT_BACKUP_DIR, DEFAULT_HELPER_IMAGE, ArchiveError, AtomicArchive, \
    BackupError, BackupResult, BatchedWriter, Progress, archive_name, describe_os_error, \
    ensure_backup_dir, log, say, utc_timestamp
from .gzipstream import CHUNK_SIZE, ParallelGzipWriter, settings_from_environment
from .tarstream import DIRECTORY, END_OF_ARCHIVE, FILE, SYMLINK, TarReader, member_header, \
    padding

HELPER_EXIT_GRACE = 10  # seconds for a helper whose stream already ended to report its exit
SPOOL_CHECK_EVERY = 64 << 20
SPOOL_RESERVE_MIN = 1 << 30  # staging never leaves less free space than this...
SPOOL_RESERVE_SHARE = 0.05  # ...or than this share of the filesystem

BACKUP_SCRIPT = "tar -C /volume -cf /transfer/stream ."
BACKUP_TO_STDOUT_SCRIPT = "tar -C /volume -cf - ."
WIPE_COMMAND = "rm -rf /volume/..?* /volume/.[!.]* /volume/*"  # hidden entries too
# The helper reads the staged plain.tar if there is one, else the stream from the FIFO.
RESTORE_SCRIPT = """if [ -e /transfer/plain.tar ]; then source=plain.tar; else source=stream; fi
exec 4</transfer/$source
%s
tar -xf - -C /volume --numeric-owner <&4
[ -e /transfer/complete ] || { echo "the archive stream ended early" >&2; exit 4; }
if [ -s /transfer/symlinks ]; then
  xargs -0 -n 4 sh -c 'chown -h "$0:$1" "$3" && touch -h -d "@$2" "$3"' </transfer/symlinks
fi
tar -xf /transfer/folders.tar -C /volume --numeric-owner""" % WIPE_COMMAND


def helper_image(environ=None):
    environ = os.environ if environ is None else environ
    return environ.get("BACKUP_HELPER_IMAGE", "").strip() or DEFAULT_HELPER_IMAGE


# --- backup -----------------------------------------------------------------

def _read_tar_from_helper(descriptor, helper, gzip_writer, volume, progress):
    """Pass the helper's tar stream into ``gzip_writer``, checking it; give the TarReader.

    Raises BackupError unless the stream is a complete tar (end-of-archive
    marker included) and the helper exited 0.
    """
    def chunks():
        # Whole chunks read straight into fresh buffers go to the compressor uncopied.
        while True:
            chunk = bytearray(CHUNK_SIZE)
            filled = 0
            while filled < CHUNK_SIZE:
                count = os.readv(descriptor, [memoryview(chunk)[filled:]])
                if not count:
                    break
                filled += count
            if not filled:
                return
            if filled < CHUNK_SIZE:
                del chunk[filled:]
            gzip_writer.write_chunk(chunk)
            progress.advance(filled)
            yield chunk
            if filled < CHUNK_SIZE:
                return

    reader = TarReader(chunks(), light=True)  # structure and end marker; restore reads fully
    try:
        for _ in reader:
            pass
    except ArchiveError as error:
        returncode = helper.wait(timeout=HELPER_EXIT_GRACE)
        if returncode:
            raise BackupError("backing up volume %s failed: the helper exited with %d: %s"
                              % (volume, returncode, helper.error_output()))
        raise BackupError("backing up volume %s failed: the tar stream from the helper is "
                          "incomplete (%s)" % (volume, error))
    helper.finish("backing up volume %s" % volume)
    return reader


def write_volume_archive(volume, output, transfer_parent, image, quiet=True):
    """Write a gzip tar of the volume into ``output``; give the TarReader that checked it.

    With ``transfer_parent`` the data comes through a FIFO in a private folder
    there; without, through the helper's stdout. The gzip stream is finished
    only on success, so a failed stream never looks complete. Raises BackupError.
    """
    level, threads = settings_from_environment()
    progress = Progress("Backing up %s" % volume, enabled=not quiet)
    gzip_writer = ParallelGzipWriter(output, level, threads)
    try:
        if transfer_parent is None:
            with docker.Helper(image, volume, BACKUP_TO_STDOUT_SCRIPT, read_only=True,
                               capture_stdout=True) as helper:
                reader = _read_tar_from_helper(helper.stdout_fd, helper, gzip_writer, volume,
                                               progress)
        else:
            with docker.TransferFolder(transfer_parent) as transfer, \
                    docker.Helper(image, volume, BACKUP_SCRIPT, read_only=True,
                                  transfer=transfer) as helper:
                descriptor = docker.open_fifo_for_reading(
                    transfer.fifo, helper, "backing up volume %s" % volume)
                try:
                    reader = _read_tar_from_helper(descriptor, helper, gzip_writer, volume,
                                                   progress)
                finally:
                    os.close(descriptor)
        gzip_writer.close()
    except BaseException:
        gzip_writer.abort()
        raise
    finally:
        progress.finish()
    return reader


def _publish_volume_archive(volume, folder, image, quiet, timestamp=None):
    """Back up the volume to ``folder/<volume>__<timestamp>.tar.gz``; give a BackupResult."""
    started = time.monotonic()
    path = os.path.join(folder, archive_name(volume, timestamp or utc_timestamp()))
    with AtomicArchive(path) as archive:
        try:
            reader = write_volume_archive(volume, archive.file, folder, image, quiet)
        except OSError as error:
            raise BackupError("cannot write %s: %s" % (path, describe_os_error(error)))
        archive.publish()
        size = os.fstat(archive.file.fileno()).st_size
    return BackupResult(volume, path, size, reader.members, time.monotonic() - started)


def backup_volume(volume, destination=DEFAULT_BACKUP_DIR, stop_containers=False, messages=None,
                  quiet=True, environ=None):
    """Back up one volume into the folder ``destination`` (or stdout for ``-``).

    Prints the old script's three lines (``Backing up volume:``, ``Output:``,
    ``OK``). Gives a BackupResult; raises BackupError (nothing published, no
    volume created) on any failure.
    """
    docker.check_volume_name(volume)
    image = helper_image(environ)
    to_stdout = destination == "-"
    if messages is None:
        messages = sys.stderr if to_stdout else sys.stdout
    if to_stdout:
        path = "-"
    else:
        ensure_backup_dir(destination)
        timestamp = utc_timestamp()
        path = os.path.join(destination, archive_name(volume, timestamp))
    say(messages, "Backing up volume: %s" % volume)
    say(messages, "Output: %s" % path)
    if not docker.volume_exists(volume):
        raise BackupError("volume %s does not exist; nothing was backed up (check the name with "
                          "'docker volume ls')" % volume)
    docker.ensure_image(image)
    with docker.containers_stopped(volume) if stop_containers else contextlib.nullcontext():
        if to_stdout:
            started = time.monotonic()
            output = sys.stdout.buffer
            try:
                reader = write_volume_archive(volume, output, None, image, quiet)
                output.flush()
            except BrokenPipeError:
                raise BackupError("backing up volume %s failed: stdout was closed" % volume)
            result = BackupResult(volume, "-", None, reader.members, time.monotonic() - started)
        else:
            result = _publish_volume_archive(volume, destination, image, quiet, timestamp)
    say(messages, "OK")
    return result


# --- restore ----------------------------------------------------------------

def _pipe_writer(descriptor):
    """A BatchedWriter into a pipe descriptor (os.write may take only part of a piece)."""
    def write_all(data):
        view = memoryview(data)
        while view:
            view = view[os.write(descriptor, view):]
    return BatchedWriter(write_all)


class _SpoolFull(Exception):
    """Staging the uncompressed archive would eat into the disk's reserve."""


class _SpoolWriter:
    """Writes the re-emitted stream to ``plain.tar``, stopping well before the disk is full.

    The free space is checked every 64 MiB; when less than the reserve
    (5% of the filesystem, at least 1 GiB) would be left, _SpoolFull is raised.
    """

    def __init__(self, path):
        self.file = open(path, "wb", buffering=BatchedWriter.BATCH)
        self.unchecked = 0
        self._check()

    def _check(self):
        status = os.fstatvfs(self.file.fileno())
        reserve = max(SPOOL_RESERVE_MIN, status.f_blocks * status.f_frsize * SPOOL_RESERVE_SHARE)
        if status.f_bavail * status.f_frsize - SPOOL_CHECK_EVERY < reserve:
            raise _SpoolFull()

    def write(self, data):
        try:
            self.file.write(data)
        except OSError as error:
            if error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _SpoolFull()
            raise
        self.unchecked += len(data)
        if self.unchecked >= SPOOL_CHECK_EVERY:
            self.unchecked = 0
            self._check()

    def flush(self):
        self.file.flush()

    def close(self):
        self.file.close()


def _emit_checked_stream(archive_file, output, transfer, progress):
    """Re-emit the archive's checked members as plain tar into ``output``; give an ArchiveSummary.

    Folder headers also go to ``folders.tar``, which the helper extracts last:
    busybox sets a folder's mtime when it creates it, and creates hard links
    and absolute symlinks only after the whole stream, both of which change
    the folders again. Symlink owners and mtimes (which busybox skips) are
    listed for the helper to set. The ``complete`` marker is created only
    after the whole archive, gzip trailer included, checked out.
    """
    archive_file.seek(0)
    reader, members, counter = checked_members(archive_file, progress)
    with open(transfer.file("folders.tar"), "wb") as folders, \
            open(transfer.file("symlinks"), "wb") as symlinks:
        for member in members:
            header = member_header(member)
            output.write(header)
            if member.kind == FILE:
                for piece in reader.data():
                    output.write(piece)
                output.write(padding(member.size))
            elif member.kind == DIRECTORY:
                folders.write(header)
            elif member.kind == SYMLINK:
                symlinks.write(b"%d\0%d\0%d\0/volume/%s\0"
                               % (member.uid, member.gid, member.mtime, member.path))
        folders.write(END_OF_ARCHIVE)
    output.flush()
    with open(transfer.file("complete"), "wb"):
        pass
    try:
        output.write(END_OF_ARCHIVE)
        output.flush()
    except BrokenPipeError:
        pass  # tar may stop reading at the first zero block; its exit code decides
    return ArchiveSummary(reader.members, reader.data_bytes, reader.offset, counter.count)


def _check_archive(archive_file, transfer, label, quiet):
    """Read and check the whole archive; give ``(ArchiveSummary, staged)``.

    The re-emitted stream is staged as ``plain.tar`` in the transfer folder
    when the disk has room, so the helper extracts a file and the archive is
    decompressed only once; otherwise it is only checked here and streamed
    in a second pass. Raises ArchiveError for a damaged or hostile archive.
    """
    total = os.fstat(archive_file.fileno()).st_size
    progress = Progress(label, total=total, enabled=not quiet)
    try:
        try:
            spool = _SpoolWriter(transfer.file("plain.tar"))
            try:
                return _emit_checked_stream(archive_file, spool, transfer, progress), True
            finally:
                spool.close()
        except _SpoolFull:
            for name in ("plain.tar", "folders.tar", "symlinks", "complete"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(transfer.file(name))
            log("too little free space in %s to stage the uncompressed archive; checking it "
                "first and streaming it in a second pass" % os.path.dirname(transfer.path))
        archive_file.seek(0)
        progress.done = 0
        return scan_archive(archive_file, progress), False
    finally:
        progress.finish()


def _extract_into_volume(volume, archive_file, transfer, staged, image, quiet):
    """Empty the volume and fill it with the checked archive (staged, or streamed again).

    Gives the ArchiveSummary of a second pass, or None when the staged copy
    was extracted. Raises BackupError if the helper or the stream fails; the
    volume may then be partly filled, which the caller rolls back.
    """
    what = "restoring volume %s" % volume
    sent = None
    with docker.Helper(image, volume, RESTORE_SCRIPT, transfer=transfer) as helper:
        if not staged:
            progress = Progress("Restoring %s" % volume,
                                total=os.fstat(archive_file.fileno()).st_size, enabled=not quiet)
            descriptor = docker.open_fifo_for_writing(transfer.fifo, helper, what)
            try:
                sent = _emit_checked_stream(archive_file, _pipe_writer(descriptor), transfer,
                                            progress)
            except BrokenPipeError:
                returncode = helper.wait(timeout=HELPER_EXIT_GRACE)
                raise BackupError("%s failed: the helper stopped reading (exit %s): %s"
                                  % (what, returncode, helper.error_output()))
            finally:
                os.close(descriptor)
                progress.finish()
        helper.finish(what)
    return sent


def _wipe_volume(volume, image):
    with docker.Helper(image, volume, WIPE_COMMAND) as helper:
        helper.finish("emptying volume %s" % volume)


def _take_safety_backup(volume, folder, image, messages, quiet):
    """Save the volume as an ordinary archive in ``folder``; give its path, or None if empty.

    Raises BackupError when it cannot be written: the restore then stops
    before anything changed.
    """
    ensure_backup_dir(folder)
    for attempt in range(2):
        try:
            result = _publish_volume_archive(volume, folder, image, quiet)
            break
        except BackupError as error:
            # A backup made in the same second has the name; the next second is free.
            if attempt or "already exists" not in str(error):
                raise BackupError("cannot save the current contents of volume %s before the "
                                  "restore, so nothing was changed: %s" % (volume, error))
            time.sleep(1.05 - time.time() % 1)
    if result.members <= 1:  # only the volume's root folder: it is empty
        os.unlink(result.path)
        return None
    say(messages, "Safety backup of the current contents: %s" % result.path)
    return result.path


def _roll_back(volume, image, work_folder, existed, safety_backup, quiet):
    """Put the volume back as it was before the restore; give a sentence saying what happened."""
    log("restore of volume %s failed; rolling back" % volume)
    try:
        if not existed:
            docker.run_docker(["volume", "rm", volume], "cannot remove volume %s" % volume)
            return "volume %s, which this restore created, was removed again" % volume
        if safety_backup is None:
            _wipe_volume(volume, image)
            return "volume %s was emptied again, as it was before" % volume
        with open(safety_backup, "rb") as snapshot, \
                docker.TransferFolder(work_folder) as transfer:
            _, staged = _check_archive(snapshot, transfer, "Checking the safety backup", quiet)
            _extract_into_volume(volume, snapshot, transfer, staged, image, quiet)
        return ("volume %s was rolled back to its previous contents from the safety backup %s"
                % (volume, safety_backup))
    except BaseException as error:  # the original failure must still be reported
        message = str(error) or error.__class__.__name__
        if safety_backup:
            return ("the rollback failed too (%s); the previous contents are in %s: restore "
                    "it with restore_docker_volume.py %s %s --force"
                    % (message, safety_backup, volume, safety_backup))
        return "the rollback failed too (%s)" % message


def restore_volume(volume, archive_path, safety_backup=True, stop_containers=False,
                   messages=None, quiet=True, environ=None):
    """Make the volume exactly what the archive holds (``-``: read it from stdin).

    Nothing changes until the whole archive checked out. Gives the path of the
    safety backup (or None). Raises BackupError; after a failed extraction the
    volume has been rolled back, and the message says so.
    """
    environ = os.environ if environ is None else environ
    messages = sys.stdout if messages is None else messages
    docker.check_volume_name(volume)
    from_stdin = archive_path == "-"
    if not from_stdin and not os.path.isfile(archive_path):
        raise BackupError("archive not found: %s" % archive_path, legacy=True)
    image = helper_image(environ)
    configured_folder = environ.get("BACKUP_DIR", "").strip()
    if configured_folder or from_stdin:
        work_folder = ensure_backup_dir(configured_folder or DEFAULT_BACKUP_DIR)
    else:
        work_folder = os.path.dirname(os.path.abspath(archive_path))
    say(messages, "Restoring volume: %s" % volume)
    say(messages, "From: %s" % archive_path)
    existed = docker.volume_exists(volume)
    docker.ensure_image(image)
    with spooled_stdin(work_folder) if from_stdin else open(archive_path, "rb") as archive_file, \
            docker.TransferFolder(work_folder) as transfer:
        before = os.fstat(archive_file.fileno())
        try:
            expected, staged = _check_archive(archive_file, transfer, "Checking archive", quiet)
        except ArchiveError as error:
            raise BackupError("the archive %s is refused: %s; volume %s was not changed"
                              % (archive_path, error, volume))
        users = docker.containers_using_volume(volume) if existed else []
        if users and not stop_containers:
            names = " ".join(name for _, name in users)
            raise BackupError("volume %s is in use by running container(s) %s; stop them first "
                              "(docker stop %s) or pass --stop-containers to stop and restart them "
                              "around the restore; nothing was changed" % (volume, names, names))
        with docker.containers_stopped(volume) if users else contextlib.nullcontext():
            snapshot = None
            if existed and safety_backup:
                snapshot = _take_safety_backup(volume, configured_folder or work_folder, image,
                                               messages, quiet)
            if not existed:
                docker.create_volume(volume)
            say(messages, "WARNING: deleting existing volume data")
            try:
                sent = _extract_into_volume(volume, archive_file, transfer, staged, image, quiet)
                after = os.fstat(archive_file.fileno())
                if sent is not None and (not sent.same_content(expected) or (
                        after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns)):
                    # Streamed a second time: it must be exactly what was checked.
                    raise BackupError("the archive changed while it was being restored")
            except BaseException as error:
                if existed and not safety_backup:
                    outcome = ("no safety backup was taken (--no-safety-backup), so volume %s "
                               "may hold a partial restore" % volume)
                else:
                    with contextlib.suppress(FileNotFoundError):  # room for the rollback
                        os.unlink(transfer.file("plain.tar"))
                    outcome = _roll_back(volume, image, work_folder, existed, snapshot, quiet)
                log(outcome)
                if isinstance(error, (BackupError, ArchiveError)):
                    raise BackupError("%s; %s" % (error, outcome))
                raise
    say(messages, "OK")
    if snapshot:
        say(messages, "Previous contents kept in: %s" % snapshot)
    return snapshot
