"""Consistency: how a volume is captured while its apps may be writing (auto, sqlite, stop, live).

auto → detect (engine markers → stop; SQLite header → sqlite; else live) → capture → copy

- ``live``: the plain copy; a file that vanishes between listing and reading
  is a warning, any other tar error fails the backup.
- ``stop``: the running containers that mount the volume are stopped for the
  copy and exactly those started again; a container started with ``--rm`` is
  refused before anything stops (stopping would remove it).
- ``sqlite``: every SQLite database (found by its 16-byte header, not its name)
  is snapshotted through SQLite's online backup API, run by ``python3`` from
  the image of a running container that uses the volume, so SQLite's own
  locks are respected. The copy then carries each snapshot under the
  database's own name and leaves out its ``-journal``, ``-wal`` and ``-shm``:
  the archive looks like a cleanly stopped volume. An image without a usable
  Python ``sqlite3`` falls back to ``stop``, and the log says so.
- ``auto``: storage of an engine that must not be copied live (Qdrant,
  PostgreSQL, MySQL/MariaDB; the markers are ``ENGINE_MARKERS``) → ``stop``;
  else any SQLite database → ``sqlite``; else ``live``.
"""

import contextlib
import json
import os
import re

from . import docker, transfer
from .errors import Unrestorable
from .files import BatchedWriter
from .tarstream import DIRECTORY, END_OF_ARCHIVE, FILE, HARDLINK, TarReader, encode_header, \
    normalize, padding, show

SQLITE_HEADER = b"SQLite format 3\0"
COMPANION_SUFFIXES = (b"-journal", b"-wal", b"-shm")
RECORD_SIZE = 20 * 512
NO_COMMAND_EXITS = (126, 127)  # docker run: the command cannot be invoked / was not found
NO_SQLITE_EXIT = 3  # the snapshot program: python3 is there, its sqlite3 module is not

# What each engine keeps in the root of its volume (or of a ``storage/`` folder in it): files
# only the running engine can read consistently, so they are never copied while it runs.
ENGINE_MARKERS = (
    ("Qdrant storage", ("raft_state.json", "storage/raft_state.json", "collections/*/*/wal",
                        "storage/collections/*/*/wal")),
    ("PostgreSQL data folder", ("PG_VERSION",)),
    ("MySQL/MariaDB data folder", ("ibdata1",)),
)

# Looks without writing (the volume is mounted read-only): one line per engine found, then
# the first 16 bytes of every file large enough to be a database (one page, 512 bytes), from
# one ``head`` per batch of files rather than one process per file. Apps keep writing
# meanwhile: a journal that is gone before head reads it is no error here.
DETECT_SCRIPT = "cd /volume\n" + "".join(
    'for m in %s; do if [ -e "$m" ]; then echo "engine %s: $m"; break; fi; done\n'
    % (" ".join(paths), meaning) for meaning, paths in ENGINE_MARKERS) + """\
echo headers
find . -type f -size +511c -exec head -c 16 {} + 2>/dev/null || true"""

# Runs as ``python3 -c`` in the app's own image (any Python 3.7+): snapshots every database
# into /transfer/snapshot-N, owned by the invoking user, and prints one JSON line for each.
SNAPSHOT_PROGRAM = r'''
import json, os, stat, sys, threading, time

def watchdog():
    # Our stdin is the backup's pipe: when the backup dies, so does this container.
    try:
        while sys.stdin.buffer.read(65536):
            pass
    finally:
        os._exit(70)

def snapshot_all(uid, gid):
    try:
        import sqlite3
        sqlite3.Connection.backup
        from urllib.parse import quote
    except (ImportError, AttributeError):
        sys.stderr.write("python3 in this image has no usable sqlite3 module\n")
        return 3
    number = 0
    for folder, subfolders, files in os.walk(b"/volume"):
        subfolders.sort()
        for name in sorted(files):
            path = os.path.join(folder, name)
            try:
                if not stat.S_ISREG(os.lstat(path).st_mode):
                    continue
                with open(path, "rb") as file:
                    if file.read(16) != b"SQLite format 3\x00":
                        continue
            except OSError:
                continue
            number += 1
            snapshot = "/transfer/snapshot-%d" % number
            started = time.monotonic()
            try:
                source = sqlite3.connect("file:%s?mode=ro" % quote(os.fsdecode(path)),
                                         uri=True, timeout=60)
                try:
                    target = sqlite3.connect(snapshot)
                    source.backup(target)  # one step: one read transaction, one state
                    target.close()
                finally:
                    source.close()
            except sqlite3.Error as error:
                sys.stderr.write("%s: %s\n" % (os.fsdecode(path), error))
                return 4
            os.chown(snapshot, uid, gid)
            os.chmod(snapshot, 0o600)
            print(json.dumps({"path": path[len(b"/volume/"):].hex(), "snapshot": snapshot[10:],
                              "seconds": time.monotonic() - started}), flush=True)
    return 0

threading.Thread(target=watchdog, daemon=True).start()
code = snapshot_all(int(sys.argv[1]), int(sys.argv[2]))
sys.stdout.flush()
sys.stderr.flush()
os._exit(code)  # no interpreter shutdown: the watchdog thread still blocks in read()
'''

# busybox tar's words for a file that was listed but gone when it came to be read (gone
# before its lstat, or between that and its open), and the last line it adds after such
# errors (its exit code is 1 for every error alike).
_VANISHED = re.compile(r"tar: (?:can't open '(.+)'|(.+)): No such file or directory")
_DELAYED_EXIT = "tar: error exit delayed from previous errors"


class NoSQLite(Exception):
    """The app's image cannot run the snapshot program (no python3, or no sqlite3 in it)."""


class Snapshot:
    def __init__(self, path, file, seconds):
        self.path, self.file, self.seconds = path, file, seconds


class Capture:
    """What a capture did, for the logs and the summary: the mode used and how it went."""

    def __init__(self, requested, mode, reason=""):
        self.requested, self.mode, self.reason = requested, mode, reason
        self.pause = None
        self.snapshots = {}  # normalised member path -> Snapshot

    def describe(self):
        words = "consistency %s" % self.mode
        if self.requested != self.mode:
            words = "consistency %s (%s)" % (self.mode, self.requested)
        if self.pause is not None:
            words += ": " + self.pause.describe()
        elif self.snapshots:
            longest = max(snapshot.seconds for snapshot in self.snapshots.values())
            words += ": %d database%s snapshotted, longest %.2f s" % (
                len(self.snapshots), "" if len(self.snapshots) == 1 else "s", longest)
        elif self.reason:
            words += ": " + self.reason
        return words


def detect(image, volume, reporter):
    """Look into the volume; give ``(mode, reason)`` for ``auto``."""
    what = "looking into volume %s" % volume
    with docker.Helper(image, volume, DETECT_SCRIPT, read_only=True,
                       capture_stdout=True) as helper:
        output = helper.read_output()
        helper.finish(what, reporter)
    findings, _, headers = output.partition(b"headers\n")
    engines = [line[len("engine "):] for line in findings.decode("utf-8", "replace").splitlines()
               if line.startswith("engine ")]
    if engines:
        return "stop", "found %s, which must not be copied while it runs" % engines[0]
    # head puts "==> name <==" lines between files, and names hold no NUL: the header's
    # 16 bytes, NUL last, can only be the first 16 bytes of some file.
    if SQLITE_HEADER in headers:
        return "sqlite", "found SQLite databases"
    return "live", "found no database files"


def _take_snapshots(image, volume, folder, reporter):
    """Snapshot every SQLite database of the volume into ``folder``; give {path: Snapshot}."""
    what = "snapshotting the SQLite databases of volume %s" % volume
    command = ["python3", "-c", SNAPSHOT_PROGRAM, str(os.getuid()), str(os.getgid())]
    with docker.Helper(image, volume, transfer_path=folder.path, capture_stdout=True,
                       command=command) as helper:
        output = helper.read_output()
        returncode = helper.wait()
        if returncode in NO_COMMAND_EXITS + (NO_SQLITE_EXIT,):
            raise NoSQLite(helper.error_output())
        if returncode != 0:
            raise helper.failed(what, returncode)
    snapshots = {}
    for line in output.decode("utf-8").splitlines():
        entry = json.loads(line)
        path = normalize(bytes.fromhex(entry["path"]))
        snapshots[path] = Snapshot(path, folder.file(entry["snapshot"]), entry["seconds"])
    return snapshots


@contextlib.contextmanager
def captured(requested, volume, image, spare_folder, reporter):
    """Hold the volume as ``requested`` for the length of the block; give the Capture.

    ``spare_folder`` is where snapshots are kept: the private work folder.
    """
    mode, reason, users = requested, "", None
    if requested == "auto":
        users = docker.containers_using_volume(volume)
        if users:
            mode, reason = detect(image, volume, reporter)
            reporter.log("volume %s: consistency auto chose %s (%s)" % (volume, mode, reason))
        else:  # nothing runs that could write: the plain copy is a consistent one
            mode, reason = "live", "no running container uses it"
    capture = Capture(requested, mode, reason)
    if mode == "live":
        yield capture
        return
    if users is None:
        users = docker.containers_using_volume(volume)
    if mode == "sqlite" and not users:
        capture.reason = "no running container uses it, so nothing writes; copied as is"
        yield capture
        return
    if mode == "sqlite":
        with transfer.TransferFolder(spare_folder) as folder:
            try:
                capture.snapshots = _take_snapshots(users[0].image, volume, folder, reporter)
            except NoSQLite as missing:
                reporter.log("volume %s: the image of container %s has no usable SQLite (%s); "
                             "stopping its containers for the copy instead"
                             % (volume, users[0].name, missing))
                capture.mode = "stop"
            if capture.mode == "sqlite":
                yield capture
                return
    with docker.containers_stopped(volume, reporter, users) as pause:
        capture.pause = pause
        yield capture


def vanished_files(returncode, lines):
    """Give the files a tar run reported as gone, if that is all that went wrong; else None."""
    if returncode != 1 or not lines:
        return None
    matches = [_VANISHED.fullmatch(line) for line in lines if line != _DELAYED_EXIT]
    if not matches or not all(matches):
        return None
    return [match.group(1) or match.group(2) for match in matches]


def left_out(snapshots):
    """Give the names (as tar shows them) of the companions the snapshots replace."""
    return {"./" + os.fsdecode(path + suffix)
            for path in snapshots for suffix in COMPANION_SUFFIXES}


def write_reemitted(chunks, output, check, snapshots, exclusions, volume=""):
    """Re-emit the volume's tar stream with snapshots put in and exclusions left out; give
    the member count.

    The database members carry their snapshot's bytes (with the live file's
    name, owner, mode and mtime); their ``-journal``, ``-wal`` and ``-shm``
    are left out, as is every member ``exclusions`` excludes (before any rule
    looks at it: excluding a device file is a way to back up its volume).
    Everything else is re-emitted as it came. ``check(member)`` applies the
    restore's rules to each member kept. Raises Unrestorable for a hard link
    whose data went with an excluded member.
    """
    reader = TarReader(chunks)
    writer = BatchedWriter(output.write)
    members = 0
    for member in reader:
        if exclusions:
            path = normalize(member.name)
            if path and exclusions.excludes(path, member.kind == DIRECTORY):
                continue
            if member.kind == HARDLINK and \
                    exclusions.excludes(normalize(member.linkname, "hard link target"), False):
                raise Unrestorable(
                    "volume %s cannot be backed up with these exclusions: %s is a hard link to "
                    "%s, which is excluded, and tar keeps their data only with the first; "
                    "exclude both or neither; nothing was published"
                    % (volume, show(member.name), show(member.linkname)))
        check(member)  # the restore's rules: sets member.path
        path = member.path
        if snapshots and any(path.endswith(suffix) and path[:-len(suffix)] in snapshots
                             for suffix in COMPANION_SUFFIXES):
            continue
        snapshot = snapshots.get(path) if member.kind == FILE else None
        size = os.path.getsize(snapshot.file) if snapshot else member.size
        writer.write(encode_header(member.name, member.kind, member.mode, member.uid,
                                   member.gid, member.mtime, size if member.kind == FILE else 0,
                                   member.linkname, member.uname, member.gname))
        members += 1
        if member.kind != FILE:
            continue
        if snapshot:
            with open(snapshot.file, "rb") as file:
                while True:
                    piece = file.read(1 << 20)
                    if not piece:
                        break
                    writer.write(piece)
        else:
            for piece in reader.data():
                writer.write(piece)
        writer.write(padding(size))
    total = writer.count + len(END_OF_ARCHIVE)
    writer.write(END_OF_ARCHIVE + bytes(-total % RECORD_SIZE))
    writer.flush()
    return members
