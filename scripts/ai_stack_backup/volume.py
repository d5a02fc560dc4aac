"""A Docker named volume as a backup source and as a restore target.

Backup: the helper's busybox tar writes the volume (members ``./…``, as the
old script did); the stream is checked as it passes into the gzip writer.
Restore: the checked stream is staged for the helper (``transfer``); then,
unless asked not to, the volume's current contents are saved as an ordinary
archive (the safety copy), the helper empties the volume and extracts, and
if anything fails after that the volume is rolled back from the safety copy.
A volume that is empty or does not exist yet has nothing to lose: the
archive is checked as it streams to the helper, in one pass (gunzip and
extraction on two cores), and a refusal or failure empties it again (or
removes it), which leaves it exactly as it was.
"""

import contextlib
import os

from . import blocked, capture, docker, transfer
from .archive import ArchiveInput, VolumeShape
from .errors import ArchiveError, ArchiveRefused, BackupError, RolledBack, Unrestorable, \
    VolumeInUse
from .exclusions import NONE
from .gzipstream import CHUNK_SIZE, MemberWriter
from .locks import volume_lock
from .pipeline import Restored
from .tarstream import ArchiveRules, TarReader


def _chunks_into(descriptor, gzip_writer, progress):
    """Yield the stream from ``descriptor`` in whole chunks, handing each to ``gzip_writer``.

    Whole chunks read straight into fresh buffers go to the compressor uncopied.
    """
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


def _finish_tar(helper, what, reporter, left_out=(), exclusions=NONE):
    """Wait for the helper's tar; files that vanished mid-copy are warnings, all else fails.

    ``left_out`` names files the archive leaves out anyway (a snapshotted
    database's journal), as do ``exclusions``: their vanishing is not worth a warning.
    """
    returncode = helper.wait()
    lines = helper.warnings()
    vanished = capture.vanished_files(returncode, lines)
    if vanished is not None:
        for name in vanished:
            if name not in left_out and not (exclusions and
                                             exclusions.excludes(name[2:], False)):
                reporter.warn("%s: %s vanished while it was backed up; skipped" % (what, name))
        return
    if returncode:
        raise helper.failed(what, returncode)
    for line in lines or []:
        reporter.warn("%s: %s" % (what, line))


def _left_out(snapshots):
    """Give the paths a backup leaves out for ``snapshots``: the companions (journal, WAL)
    of the databases it snapshotted."""
    return {path + suffix for path in snapshots for suffix in capture.COMPANION_SUFFIXES}


class _RulesOfRestore:
    """The restore's rules, applied to a backup as it is made: nothing is published that a
    restore would refuse (a device node, say). Raises Unrestorable naming the member."""

    def __init__(self, volume):
        self.volume = volume
        self._rules = ArchiveRules()

    def check(self, member):
        try:
            self._rules.check(member)
        except ArchiveError as error:
            raise Unrestorable("volume %s cannot be backed up as it is: %s [%s], and a restore "
                               "would refuse such an archive, so nothing was published; remove "
                               "that entry from the volume" % (self.volume, error, error.rule))


class VolumeSource:
    """A volume to back up, captured by ``consistency`` (see ``capture``: live, stop, sqlite,
    auto). ``waiting``: the transfer folder and helper of a restore of this volume, waiting
    in ``transfer.probed_restore`` (its safety copy is then listed and tarred by that helper,
    one container start less)."""

    kind = "volume"
    uses_work_folder = True

    def __init__(self, volume, config, consistency="live", exclusions=NONE, waiting=None):
        self.name = self.archive_source = volume
        self.exclusions = exclusions
        self.image = config.helper_image
        self.consistency = consistency
        self.waiting = waiting

    def check(self):
        docker.check_volume_name(self.name)

    def prepare(self, reporter):
        docker.require_volume(self.name, "backed up")
        docker.ensure_image(self.image, reporter)

    @contextlib.contextmanager
    def captured(self, reporter, work_folder):
        """Hold the volume still, or snapshot its databases, for the copy; give the Capture.

        The volume's lock is held throughout: no restore can change it meanwhile.
        """
        with volume_lock(self.name), \
                capture.captured(self.consistency, self.name, self.image, work_folder,
                                 reporter) as held:
            yield held

    @contextlib.contextmanager
    def planned(self, reporter, work_folder):
        """Start the helper that lists the volume and then tars what the plan names; give its
        ``transfer.PlannedStream``, for ``write_planned``."""
        what = "backing up volume %s" % self.name
        if self.waiting is not None and self.waiting[1].running():
            stream = transfer.planned_step(self.waiting[0], self.waiting[1], what)
        else:  # none waits, or it was stopped (``planned_step``)
            stream = transfer.planned_tar_stream(self.image, self.name, work_folder, what)
        with stream as planned:
            yield planned
            if self.waiting is None:  # a restore's safety copy: that restore removes them
                for name in planned.set_aside():
                    reporter.warn(
                        "volume %s holds %s, the old contents a restore set aside and was "
                        "stopped before it removed them; they are in this backup too. Once the "
                        "volume is as it should be, remove that folder: docker run --rm "
                        "--network none -v %s:/volume %s rm -rf /volume/%s"
                        % (self.name, name, self.name, self.image, name))

    def listing(self, planned, previous=None, held=None):
        """Give the helper's listing (a ``blocked.Listing``) once it is complete.

        With a ``previous`` archive to copy from, the plan is made from the
        listing while the helper still writes it, and its names are handed to
        the helper's plan file as they come (the helper reads that file only
        when told): the Listing's ``plan`` holds it for ``write_planned``. The
        two then run at once, on two cores, and the plan is ready when the
        listing is.
        """
        early = None
        if previous is not None:
            snapshots = held.snapshots if held else {}
            early = blocked.HeldPlan(previous)
            with contextlib.closing(planned.listing_as_written()) as growing:
                try:
                    planned.write_plan(early.names_to_tar(blocked.plan(
                        blocked.entries_as_written(growing.read, self.exclusions,
                                                   _left_out(snapshots)),
                        previous, snapshots)))
                except (ValueError, ArchiveError):
                    early = None  # a line no entry is made of: read_listing tells why
        listing = blocked.read_listing(*planned.wait_for_listing())
        listing.plan = early  # a listing with a problem is planned from by nobody
        return listing

    def write_planned(self, output, config, progress, reporter, planned, listing, previous,
                      held, exclude=()):
        """Write the archive into ``output`` from the ``listing`` (a ``blocked.Listing``),
        copying what ``previous`` (a ``blocked.Previous``, or None) proves unchanged and
        having the helper tar the rest; give ``(members, blocks)`` (``blocks``: the record's
        list). A listing with a problem is never planned from: the pipeline has the whole
        volume tarred instead."""
        snapshots = held.snapshots if held else {}

        def make():
            return blocked.plan(blocked.entries(listing, self.exclusions, _left_out(snapshots)),
                                previous, snapshots)
        plan = listing.plan
        if plan is not None and plan.previous is previous:
            planned.send("plan")  # its names went to the helper while it listed
        else:
            plan = blocked.HeldPlan(previous)
            everything = previous is None and not snapshots and not self.exclusions
            planned.send("plan", blocked.every_name(listing) if everything
                         else plan.names_to_tar(make()))
        made = self._assembled(output, config, reporter, planned, snapshots,
                               lambda chunks, writer, check: blocked.assemble(
                                   plan.items(make), chunks, writer, previous, snapshots,
                                   listing.started, check, progress))
        line = blocked.describe(made, previous, "volume %s" % self.name)
        if line:
            reporter.log(line)
        return made.members, made.blocks

    def writes_while_listing(self, previous, held):
        """Whether the helper can tar the volume while it lists it: for a first backup
        (nothing to copy from ``previous``), with nothing left out or snapshotted (``held``)."""
        return previous is None and not self.exclusions and not (held and held.snapshots)

    def write_while_listing(self, output, config, progress, reporter, planned, previous=None,
                            exclude=()):
        """Write the whole volume into ``output`` as the helper tars it while it is still
        listing it (``writes_while_listing``); give ``(members, blocks, listing)``."""
        planned.send("full")
        try:
            started = int(planned.started())
        except ValueError:  # trust no line; the listing is then flagged as unusable
            started = 0
        with contextlib.closing(planned.listing_as_written()) as growing:
            listed = blocked.GrowingListing(growing.read)
            made = self._assembled(output, config, reporter, planned, {},
                                   lambda chunks, writer, check: blocked.assemble_while_listing(
                                       listed, chunks, writer, started, check, progress))
        listing = self.listing(planned)  # the helper ended only once it was complete
        if listing.problem is not None:
            blocked.forget_listing(made.blocks)
        return made.members, made.blocks, listing

    def _assembled(self, output, config, reporter, planned, snapshots, assemble):
        """Give what ``assemble(chunks, writer, check)`` made of the helper's tar stream,
        once the helper's tar ended well."""
        what = "backing up volume %s" % self.name
        writer = MemberWriter(output, config.gzip_level, config.threads)
        with planned.opened() as (descriptor, helper):
            rules = _RulesOfRestore(self.name)
            try:
                made = assemble(transfer.stream_chunks(descriptor), writer, rules.check)
            except ArchiveError as error:
                writer.abort()
                returncode = helper.wait(timeout=docker.HELPER_EXIT_GRACE)
                if returncode:
                    raise helper.failed(what, returncode)
                raise BackupError("%s failed: the tar stream from the helper is incomplete (%s)"
                                  % (what, error))
            except BaseException:
                writer.abort()
                raise
            _finish_tar(helper, what, reporter, capture.left_out(snapshots), self.exclusions)
        return made

    def write_tar(self, output, progress, reporter, work_folder=None, exclude=(), held=None,
                  listed=None):
        """Pass the helper's tar of the volume into ``output``, checking it; give the members.

        ``held`` is the Capture of ``captured`` (its database snapshots go in),
        ``listed`` a ``transfer.PlannedStream`` told to tar it all (else a helper of its own
        is started).
        With database snapshots or exclusions the stream is re-emitted, with the
        snapshots put in and the excluded paths left out.
        Raises DockerError unless the stream is a complete tar (end-of-archive
        marker included) and the helper's tar ended well.
        """
        what = "backing up volume %s" % self.name
        snapshots = held.snapshots if held else {}
        stream = listed.opened() if listed is not None else \
            transfer.volume_tar_stream(self.image, self.name, work_folder, what)
        with stream as (descriptor, helper):
            rules = _RulesOfRestore(self.name)
            try:
                if snapshots or self.exclusions:
                    members = capture.write_reemitted(
                        transfer.stream_chunks(descriptor, progress), output, rules.check,
                        snapshots, self.exclusions, self.name)
                else:
                    reader = TarReader(_chunks_into(descriptor, output, progress))
                    for member in reader:
                        rules.check(member)
                    members = reader.members
            except ArchiveError as error:
                returncode = helper.wait(timeout=docker.HELPER_EXIT_GRACE)
                if returncode:
                    raise helper.failed(what, returncode)
                raise BackupError("%s failed: the tar stream from the helper is incomplete (%s)"
                                  % (what, error))
            _finish_tar(helper, what, reporter, capture.left_out(snapshots), self.exclusions)
        return members


class VolumeTarget:
    """A volume to restore into: created if missing, refused while running containers use it
    (unless ``stop_containers``), saved first unless ``safety_copy`` is off."""

    kind = "volume"

    def __init__(self, volume, config, safety_copy=True, stop_containers=False, labels=None,
                 lock_held=False, seen=None):
        self.name = volume
        self.description = "volume %s" % volume
        self.config = config
        self.image = config.helper_image
        self.safety_copy = safety_copy
        self.stop_containers = stop_containers
        self.labels = labels  # for a volume the restore creates
        self.lock_held = lock_held  # the caller holds the volume's lock already (the drill)
        self.seen = seen  # shown the archive as it streams in (``transfer.emit_checked_stream``)
        self.existed = None
        self.probe = None  # transfer.VolumeProbe of an existing volume

    def check(self, archive_path):
        docker.check_volume_name(self.name)

    def prepare(self, reporter):
        self.existed = docker.volume_exists(self.name)
        docker.ensure_image(self.image, reporter)

    @property
    def _nothing_to_lose(self):
        return not self.existed or self.probe.empty

    @property
    def reads_once(self):
        """A volume that does not exist yet is filled in one pass: stdin need not be kept."""
        return not self.existed

    @contextlib.contextmanager
    def staged(self, archive, work_folder, progress, reporter):
        """Check the archive into a transfer folder, holding the volume's lock until the end;
        for a volume with nothing to lose, only prepare the folder (one pass in ``apply``)."""
        with contextlib.nullcontext() if self.lock_held else volume_lock(self.name), \
                transfer.TransferFolder(work_folder) as folder, \
                transfer.probed_restore(self.image, self.name, folder) if self.existed \
                else contextlib.nullcontext((None, None)) as (probe, helper):
            self.probe = probe  # under the lock: what the volume holds now
            if self._nothing_to_lose:
                yield _Staged(folder, False, work_folder, None, helper, one_pass=True)
                return
            summary, staged = transfer.stage(archive, folder, progress, VolumeShape())
            if not staged:
                reporter.log("too little free space in %s to stage the uncompressed archive; "
                             "checked it first, streaming it in a second pass" % work_folder)
            yield _Staged(folder, staged, work_folder, summary, helper)

    def apply(self, staged, archive, reporter, save_copy):
        spare = -1  # bytes free beside the old contents and the new: none known
        if staged.summary is not None:
            spare = transfer.space_check(self.probe, self.name, staged.summary,
                                         staged.folder.size(transfer.PLAIN))
        users = docker.containers_using_volume(self.name, staged.helper) if self.existed else []
        if users and not self.stop_containers:
            names = " ".join(container.name for container in users)
            raise VolumeInUse("volume %s is in use by running container(s) %s; stop them first "
                              "(docker stop %s) or pass --stop-containers to stop and restart "
                              "them around the restore; nothing was changed"
                              % (self.name, names, names), [container.name for container in users])
        closing = []
        with docker.containers_stopped(self.name, reporter, users) if users \
                else contextlib.nullcontext():
            snapshot = None
            if not self._nothing_to_lose and self.safety_copy:
                snapshot = self._save_current(reporter, save_copy, archive.name, staged)
            # The safety copy was written after the volume was measured, perhaps to the
            # same filesystem (a hard link to an archive counts too: it costs no more).
            aside = spare - (os.path.getsize(snapshot) if snapshot else 0) >= 0
            if not self.existed:
                docker.create_volume(self.name, self.labels)
            reporter.status("WARNING: deleting existing volume data")
            # The safety copy's step may have had to stop the waiting helper.
            waiting = staged.helper if staged.helper is not None and staged.helper.running() \
                else None
            try:
                transfer.fill_volume(self.image, self.name, archive, staged.folder,
                                     staged.staged, reporter, not staged.one_pass,
                                     VolumeShape() if staged.one_pass else None, waiting,
                                     self.seen, aside)
            except BaseException as error:
                if staged.one_pass and isinstance(error, ArchiveError):
                    outcome = self._roll_back(staged.work_folder, None, reporter)
                    reporter.log(outcome)
                    raise ArchiveRefused("the archive %s is refused [%s]: %s; %s"
                                         % (archive.name, error.rule, error, outcome),
                                         error.rule)
                if not self._nothing_to_lose and not self.safety_copy:
                    outcome = ("no safety backup was taken (--no-safety-backup), so volume %s "
                               "may hold a partial restore" % self.name)
                else:
                    staged.folder.discard(transfer.PLAIN)  # room for the rollback
                    outcome = self._roll_back(staged.work_folder, snapshot, reporter)
                reporter.log(outcome)
                if isinstance(error, BackupError):
                    raise RolledBack("%s; %s" % (error, outcome))
                raise
        if snapshot:
            closing.append("Previous contents kept in: %s" % snapshot)
        undo = None
        if snapshot is not None or self._nothing_to_lose:
            def undo(undo_reporter):
                return self._roll_back(staged.work_folder, snapshot, undo_reporter)
        return Restored(closing, undo)

    def _save_current(self, reporter, save_copy, archive_path, staged):
        """Save the volume as an ordinary archive (in the work folder), listed and tarred by
        the helper that waits to restore it (``staged``); give its path.

        Raises BackupError when it cannot be written: the restore then stops
        before anything changed.
        """
        try:
            result = save_copy(VolumeSource(self.name, self.config,
                                            waiting=(staged.folder, staged.helper)),
                               archive_path if archive_path != "-" else None)
        except BackupError as error:
            raise BackupError("cannot save the current contents of volume %s before the "
                              "restore, so nothing was changed: %s" % (self.name, error))
        reporter.status("Safety backup of the current contents: %s" % result.path)
        return result.path

    def _roll_back(self, work_folder, snapshot, reporter):
        """Put the volume back as it was before the restore; give a sentence saying what
        happened."""
        reporter.log("rolling back volume %s" % self.name)
        try:
            if not self.existed:
                transfer.remove_volume(self.image, self.name, reporter)
                return "volume %s, which this restore created, was removed again" % self.name
            if snapshot is None:
                transfer.wipe_volume(self.image, self.name, reporter, self.probe.root)
                return ("volume %s was emptied again, its root folder's owner, mode and mtime "
                        "put back, as it was before" % self.name)
            with open(snapshot, "rb") as file, transfer.TransferFolder(work_folder) as folder:
                archive = ArchiveInput(file, snapshot)
                with reporter.silent().progress("Checking the safety backup") as progress:
                    _, staged = transfer.stage(archive, folder, progress)
                transfer.fill_volume(self.image, self.name, archive, folder, staged, reporter)
            return ("volume %s was rolled back to its previous contents from the safety backup %s"
                    % (self.name, snapshot))
        except BaseException as error:  # the original failure must still be reported
            message = str(error) or error.__class__.__name__
            if snapshot:
                return ("the rollback failed too (%s); the previous contents are in %s: restore "
                        "it with restore_docker_volume.py %s %s --force"
                        % (message, snapshot, self.name, snapshot))
            return "the rollback failed too (%s)" % message


class _Staged:
    """What ``staged`` prepared: the transfer folder, whether ``plain.tar`` is staged there,
    the checked archive's summary (None: not checked yet, ``one_pass``), and the helper
    waiting to restore an existing volume (``transfer.probed_restore``; None: start one)."""

    def __init__(self, folder, staged, work_folder, summary, helper, one_pass=False):
        self.folder, self.staged, self.work_folder = folder, staged, work_folder
        self.summary, self.helper, self.one_pass = summary, helper, one_pass
