"""Blocked archives built mostly from the previous one's bytes (a volume's nightly backup).

listing ‖ plan (the record proves what is unchanged; lines as they come) → helper tars the rest
  → assemble: members copied from the previous archive ‖ new members (parallel gzip) → record
first backup: helper tars everything ‖ lists → assemble_while_listing (lines as they come)

An archive is a complete ``.tar.gz`` whose gzip stream is a sequence of
members (``gzipstream``). Each member holds whole tar members: a *run* of
consecutive small entries (up to RUN_SIZE of tar), or, for a file of
LARGE_FILE bytes or more (and every SQLite snapshot), a *head* member with
its tar header and one *piece* member per PIECE_SIZE of its data. The end
of the archive is its own member. The record (``<archive>.listing``) keeps,
for every member, where it lies and what it holds: a run by the SHA-256 of
the listing lines of its entries, a head by its entry's line, a piece by
the SHA-256 of its bytes.

The next backup lists the volume first. A run whose entries' lines are all
still the same (same names in the same order, each line with the same
ctime, inode, size, mode, owner and mtime) is copied, not read; so is a
large file whose line is the same. A large file that changed is read
whole, but only its changed pieces are compressed. Everything else is
tarred by the helper and compressed. An entry whose ctime is as new as the
listing's start, or a file with more than one name (tar keeps a hard
link's data once per run), is never recorded as reusable: it is read
every time. The previous archive is trusted only while it is the file its
record names (inode, size, mtime, ``.sha256``); each member copied must
match the CRC-32 of its bytes in the record.
"""

import collections
import hashlib
import json
import os
import stat
import zlib

from .errors import ArchiveError, BackupError
from .files import LISTING_SUFFIX, publish_text
from .gzipstream import member_length
from .tarstream import END_OF_ARCHIVE, FILE, HARDLINK, Member, TarReader, encode_header, \
    normalize, padding
from .transfer import ODD_NAME_LINE
from .unchanged import FORMAT as RECORD_FORMAT, archive_identity, checksum_of

RUN_SIZE = 1 << 20  # a run member closes once it holds this much tar
LARGE_FILE = 1 << 20  # a file this large gets its own members, one per piece
PIECE_SIZE = 1 << 20
RECORD_SIZE = 20 * 512
END_LIMIT = 1 << 20  # an end member of zeros is copied only up to this size
FORMAT = "ai_stack_backup blocked 1"


def _sha(data):
    return hashlib.sha256(data).hexdigest()


def path_of(name):
    """Give a listed name's normalised path; raises ArchiveError (see ``normalize``)."""
    # The helper's names are "./a/b": cut the "./" unless normalising has more to do.
    plain = b"/." not in name and b"//" not in name and not name.endswith(b"/")
    if plain and name.startswith(b"./"):
        return name[2:]
    if plain and not name.startswith((b".", b"/")) and name:  # a path's "output/a"
        return name
    return normalize(name)


class Entry:
    """One line of the helper's listing (``transfer.LISTING_FORMAT``)."""

    __slots__ = ("line", "name", "path", "ctime", "links", "size", "mode", "_fields")

    def __init__(self, line):
        fields = line.split(b" ", 8)
        if len(fields) != 9:
            raise ValueError("a listing line has %d fields" % len(fields))
        self.line = line
        self._fields = fields  # inode, owner and mtime are read only where needed
        self.ctime, self.links, self.size = int(fields[0]), int(fields[2]), int(fields[3])
        self.mode = int(fields[4], 16)
        self.name = fields[8]
        self.path = path_of(fields[8])

    @property
    def folder(self):
        return stat.S_ISDIR(self.mode)

    @property
    def inode(self):
        return int(self._fields[1])

    @property
    def uid(self):
        return int(self._fields[5])

    @property
    def gid(self):
        return int(self._fields[6])

    @property
    def mtime(self):
        return int(self._fields[7])

    def large(self):
        return stat.S_ISREG(self.mode) and self.size >= LARGE_FILE

    def trusted(self, started):
        """Whether the line proves the content: no change in the listing's own second or
        later, and one name only (tar writes a hard link's data once per run)."""
        return self.ctime < started and (self.folder or self.links == 1)


class Listing:
    """The helper's listing: ``path`` of the file, ``started`` (the helper's second),
    ``digest`` of the whole text, ``racy`` (some entry changed from ``started`` on),
    ``problem`` (why it cannot be planned from: the whole volume is then tarred)."""

    def __init__(self, path, started, digest, racy, problem=None):
        self.path, self.started, self.digest, self.racy = path, started, digest, racy
        self.problem = problem
        self.plan = None  # a HeldPlan made while the listing was written, if any


def _harmless(errors):
    """Whether the listing's errors are only entries gone between readdir and stat."""
    lines = errors.decode("utf-8", "replace").strip().splitlines()
    return all(line.startswith(("stat: ", "find: ")) and
               line.endswith("No such file or directory") for line in lines)


def read_listing(started, path, errors):
    """Give the Listing of what ``transfer.PlannedStream.wait_for_listing`` found."""
    try:
        started = int(started)
    except ValueError:
        return Listing(path, 0, None, True, "the helper gave no start time")
    if errors.strip() and not _harmless(errors):
        return Listing(path, started, None, True, "the listing failed: %s" % errors.decode(
            "utf-8", "replace").strip().splitlines()[-1])
    digest = hashlib.sha256()
    racy = bool(errors.strip())
    try:
        with open(path, "rb") as file:
            for line in file:
                if line == ODD_NAME_LINE + b"\n":
                    return Listing(path, started, None, True, "some names hold a line break")
                digest.update(line)
                if not racy and int(line[:line.index(b" ")]) >= started:  # the ctime
                    racy = True
    except ValueError as error:
        return Listing(path, started, None, True, "the listing cannot be read (%s)" % error)
    return Listing(path, started, digest.hexdigest(), racy)


def entries(listing, exclusions, left_out):
    """Yield the listing's Entries in order, without the excluded ones and ``left_out``
    (normalised paths: the companions of snapshotted databases)."""
    with open(listing.path, "rb") as file:
        yield from _kept_entries((line.rstrip(b"\n") for line in file), exclusions, left_out)


def entries_as_written(read, exclusions, left_out):
    """Yield the Entries of a listing the helper is still writing, as ``entries`` does:
    ``read()`` gives its next bytes, b"" once it is complete. Raises ValueError or
    ArchiveError at a line no Entry is made of (a name with a line break: such a listing is
    unusable, ``read_listing`` says so)."""
    lines = (line for written in _lines_as_written(read) for line in written)
    return _kept_entries(lines, exclusions, left_out)


def _lines_as_written(read):
    """Yield the lines of a file still being written, as lists, each list the lines that
    ``read()``'s next bytes ended (b"": the file is complete); then its last line if no
    line break ends it."""
    rest = b""
    while True:
        data = read()
        if not data:
            break
        complete = (rest + data).split(b"\n")
        rest = complete.pop()  # a line not yet ended
        yield complete
    if rest:
        yield [rest]


def _kept_entries(lines, exclusions, left_out):
    excluding = bool(exclusions)
    for line in lines:
        entry = Entry(line)
        if excluding and entry.path and exclusions.excludes(entry.path, entry.folder):
            continue
        if entry.path in left_out:
            continue
        yield entry


# --- the previous archive ---------------------------------------------------------------

class Block:
    """One gzip member of an archive as the record keeps it: ``kind`` (run, head, piece,
    end), ``offset``, ``length``, ``crc`` and ``size`` (its trailer), ``bytes_crc`` (CRC-32
    of its compressed bytes) and ``key`` (run: [first path, count, digest of the listing
    lines or None, SHA-256 of its tar bytes (records before it have three items)]; head:
    [path, line digest]; piece: [path, index, SHA-256 of its bytes]; a listing digest of
    None: never reusable by its listing)."""

    __slots__ = ("kind", "offset", "length", "crc", "size", "bytes_crc", "key")

    def __init__(self, kind, offset, length, crc, size, bytes_crc, key):
        self.kind, self.offset, self.length, self.crc, self.size = kind, offset, length, crc, size
        self.bytes_crc, self.key = bytes_crc, key

    def saved(self):
        return [self.kind, self.offset, self.length, self.crc, self.size, self.bytes_crc,
                self.key]


class Previous:
    """The newest archive of a source as a source of members: ``path``, its open
    ``descriptor``, and its Blocks indexed for the plan."""

    def __init__(self, path, descriptor, blocks):
        self.path, self.descriptor = path, descriptor
        self._all = blocks
        self.runs = collections.defaultdict(list)  # first path -> run Blocks
        self.contents = {}  # (first path, count) -> the run Block whose tar bytes' SHA-256 is known
        self.starts = set()  # the first path of every run
        self.heads = {}  # path -> (head Block, [piece Blocks])
        self.pieces = {}  # path -> {index: piece Block}
        self.end = None  # the end member's Block
        for block in blocks:
            if block.kind == "run":
                first = bytes.fromhex(block.key[0])
                self.starts.add(first)
                if block.key[2] is not None:
                    self.runs[first].append(block)
                if len(block.key) > 3 and block.key[3]:
                    self.contents[(first, block.key[1])] = block
            elif block.kind == "head":
                path_ = bytes.fromhex(block.key[0])
                self.heads[path_] = (block, [])
                self.pieces[path_] = {}
            elif block.kind == "piece":
                path_ = bytes.fromhex(block.key[0])
                if path_ in self.heads:
                    self.heads[path_][1].append(block)
                    self.pieces[path_][block.key[1]] = block
            elif block.kind == "end":
                self.end = block

    def member(self, block):
        """Give the member ``block`` names, read and checked; raises ArchiveError."""
        data = os.pread(self.descriptor, block.length, block.offset)
        if len(data) != block.length or zlib.crc32(data) != block.bytes_crc or \
                member_length(data[:24]) != block.length:
            raise ArchiveError("%s is not the file it was when written: its member at byte %d "
                               "does not match its record" % (self.path, block.offset),
                               "gzip-crc")
        return data

    def end_member(self):
        """Give the end member, read and checked, if it inflates to zeros only, at least an
        end-of-archive marker's worth (any such end will do for any archive); else None.
        Raises ArchiveError."""
        if self.end is None or self.end.size < len(END_OF_ARCHIVE) or \
                self.end.size > END_LIMIT:
            return None
        member = self.member(self.end)
        try:
            data = zlib.decompress(member, 16 + zlib.MAX_WBITS)
        except zlib.error:
            return None
        return member if len(data) == self.end.size and not data.strip(b"\0") else None

    def check(self):
        """Read and check every member the record names; raises ArchiveError at the first
        that does not match."""
        for block in self._all:
            self.member(block)

    def close(self):
        os.close(self.descriptor)


def open_previous(path, record, made_by):
    """Give a Previous for the archive at ``path`` with its ``record`` (from
    ``unchanged.read_record``), or a sentence saying why it cannot give members."""
    blocks = record.get("blocks")
    if record.get("blocked") != FORMAT or not isinstance(blocks, list):
        return "%s was written without a record of its members" % path
    if record.get("recipe") != made_by:
        return "%s was made with other settings (exclusions, consistency, snapshotted " \
               "databases or format)" % path
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as error:
        return "%s cannot be opened (%s)" % (path, error.strerror)
    try:
        if archive_identity(os.fstat(descriptor)) != record["archive"] or \
                checksum_of(path) != record["sha256"]:
            raise ValueError
        parsed = [Block(*item) for item in blocks]
    except (OSError, ValueError, TypeError):
        os.close(descriptor)
        return "%s is not the file it was when written" % path
    return Previous(path, descriptor, parsed)


# --- the plan ---------------------------------------------------------------------------

REUSE, FRESH, SNAPSHOT = "reuse", "fresh", "snapshot"


def plan(listed, previous, snapshots):
    """Yield ``(REUSE, [Block, …])``, ``(FRESH, Entry)`` or ``(SNAPSHOT, Entry)`` for the
    listed entries, in order; the same every time for the same input."""
    window = collections.deque()
    source = iter(listed)

    def fill(count):
        while len(window) < count:
            entry = next(source, None)
            if entry is None:
                return False
            window.append(entry)
        return True

    while fill(1):
        entry = window[0]
        if entry.path in snapshots:
            window.popleft()
            yield SNAPSHOT, entry
            continue
        if entry.large():
            window.popleft()
            found = previous.heads.get(entry.path) if previous else None
            if found and found[0].key[1] == _sha(entry.line) and \
                    len(found[1]) == -(-entry.size // PIECE_SIZE):
                yield REUSE, [found[0]] + found[1]
            else:
                yield FRESH, entry
            continue
        for block in previous.runs.get(entry.path, ()) if previous else ():
            count = block.key[1]
            if fill(count):
                digest = hashlib.sha256()
                for index in range(count):
                    digest.update(window[index].line + b"\n")
                if digest.hexdigest() == block.key[2]:
                    for _ in range(count):
                        window.popleft()
                    yield REUSE, [block]
                    break
        else:
            window.popleft()
            yield FRESH, entry


# --- the assembly -----------------------------------------------------------------------

class Assembly:
    """What ``assemble`` made: ``members`` (tar members), ``blocks`` (the record's list),
    ``reused`` and ``written`` (uncompressed bytes copied and compressed)."""

    def __init__(self):
        self.members = 0
        self.blocks = []
        self.reused = 0
        self.written = 0


class _Run:
    """The small entries gathered for the next run member."""

    def __init__(self):
        self.data = bytearray()
        self.first = None
        self.count = 0
        self.lines = []
        self.trusted = True

    def add(self, entry, member_bytes, trusted):
        if self.first is None:
            self.first = entry.path
        self.data += member_bytes
        self.count += 1
        self.lines.append(entry.line)
        self.trusted = self.trusted and trusted

    def digest(self):
        """Give the SHA-256 of the entries' listing lines, each with its line break, as
        ``plan`` computes it for a run it may copy."""
        return _sha(b"\n".join(self.lines) + b"\n")


class Assembler:
    """Puts one archive's members through a MemberWriter in order: blocks copied from the
    previous archive, runs of small entries, large files as a head and pieces, the end;
    ``finish()`` gives the Assembly (what was made, and the record's list)."""

    def __init__(self, writer, previous, progress):
        self.writer, self.previous, self.progress = writer, previous, progress
        self.result = Assembly()
        self._run = _Run()
        self._position = 0  # the tar offset of what comes next

    def _placed(self, kind, key):
        """Give the ``placed`` that records a member (``key(digest)`` for a piece's)."""
        def placed(offset, length, crc, size, bytes_crc, digest, copied):
            saved_key = key(digest) if callable(key) else key
            self.result.blocks.append(Block(kind, offset, length, crc, size, bytes_crc,
                                            saved_key).saved())
            if copied:
                self.result.reused += size
            else:
                self.result.written += size
        return placed

    def _reuse(self, block, digest_at, size):
        """Give the ``reuse(digest)`` a compressing worker calls: the previous archive's
        ``block`` as ``(descriptor, offset, its bytes)`` when the SHA-256 its key holds at
        ``digest_at`` and its size are those of the new data, else None."""
        previous = self.previous

        def reuse(digest):
            if block is not None and block.key[digest_at] == digest and block.size == size:
                return previous.descriptor, block.offset, block.bytes_crc, \
                    previous.member(block)
            return None
        return reuse

    def _close_run(self):
        """Write the gathered run. A worker hashes its tar bytes: where the previous archive
        has a run of the same entries with the same bytes (say, a restored volume: its
        files are new to the listing, but not their contents), that member is copied."""
        current = self._run
        if current.count:
            first, count = current.first, current.count
            listed = current.digest() if current.trusted else None
            data = bytes(current.data)
            old = self.previous.contents.get((first, count)) if self.previous else None
            self.writer.compress(data, self._placed("run", lambda digest: [
                first.hex(), count, listed, digest]), self._reuse(old, 3, len(data)))
            self._position += len(data)
            self.progress.advance(len(data))
        self._run = _Run()

    def copy(self, blocks):
        """Copy the previous archive's members ``blocks`` (a REUSE item) as they are."""
        self._close_run()
        for block in blocks:
            self.writer.copy(self.previous.descriptor, block.offset, block.bytes_crc,
                             self.previous.member(block),
                             self._placed(block.kind, block.key))
            self._position += block.size
            self.progress.advance(block.size)
            if block.kind == "run":
                self.result.members += block.key[1]
            elif block.kind == "head":
                self.result.members += 1

    def small(self, entry, header, data, trusted):
        """Add one small entry (its header, and its data with tar's padding) to the run.
        Entries that are not ``trusted`` go in runs of their own, several in a row sharing
        one: they are read every time, their neighbours need not be (and a burst of them,
        files written just before the listing, costs no member apiece).

        A run also closes where one of the previous archive's began, so the runs after an
        entry added or removed are cut as before and can be copied by their content."""
        current = self._run
        if current.count and (current.trusted != trusted or self.previous is not None and
                              entry.path in self.previous.starts):
            self._close_run()
            current = self._run
        current.add(entry, header, trusted)
        current.data += data
        self.result.members += 1
        if len(current.data) >= RUN_SIZE:
            self._close_run()

    def gone(self):
        """An entry of the plan that was not found: the run is not what its lines say."""
        self._run.trusted = False

    def large(self, entry, header, size, chunks, trusted):
        """Add a large file (or a snapshot) as a head member and piece members, copying the
        previous archive's equal pieces. Raises BackupError if ``chunks`` do not hold
        ``size`` bytes."""
        self._close_run()
        self.writer.compress(header, self._placed("head", [
            entry.path.hex(), _sha(entry.line) if trusted else None]))
        self._position += len(header)
        old = self.previous.pieces.get(entry.path, {}) if self.previous else {}
        index = 0
        buffer = bytearray()
        total = 0
        for chunk in chunks:
            buffer += chunk
            total += len(chunk)
            while len(buffer) >= PIECE_SIZE:
                with memoryview(buffer) as view:  # one copy, not two (a slice, then bytes)
                    piece = bytes(view[:PIECE_SIZE])
                self._piece(entry, index, piece, old)
                del buffer[:PIECE_SIZE]
                index += 1
        if total != size:
            raise BackupError("%s changed size while it was read" % entry.name.decode(
                "utf-8", "replace"))
        buffer += padding(size)
        if buffer:
            self._piece(entry, index, bytes(buffer), old)
        self.result.members += 1

    def _piece(self, entry, index, piece, old):
        """Write one piece; a worker hashes it and copies the previous archive's equal one."""
        self.writer.compress(piece, self._placed("piece", lambda digest: [
            entry.path.hex(), index, digest]), self._reuse(old.get(index), 2, len(piece)))
        self._position += len(piece)
        self.progress.advance(len(piece))

    def finish(self, length=None):
        """Write the end of the archive; wait for every member; give the Assembly.

        The end is two zero blocks and zeros up to a whole tar record, or up to ``length``
        bytes of tar (a tar stream passed on whole: its own end, as long as it was)."""
        self._close_run()
        # The previous archive's end is copied where it is zeros (any such end will do): an
        # archive of what the previous one holds, laid out the same, is then that archive
        # byte for byte, and published as a link to it (``files.AtomicArchive``).
        reused = self.previous.end_member() if self.previous is not None and length is None \
            else None
        if reused is not None:
            block = self.previous.end
            self.writer.copy(self.previous.descriptor, block.offset, block.bytes_crc, reused,
                             self._placed("end", []))
        else:
            if length is not None and length - self._position >= len(END_OF_ARCHIVE):
                end = bytes(length - self._position)
            else:
                end = END_OF_ARCHIVE + bytes(-(self._position + len(END_OF_ARCHIVE))
                                             % RECORD_SIZE)
            self.writer.compress(end, self._placed("end", []))
        self.writer.close()
        return self.result


def assemble(items, stream_chunks, writer, previous, snapshots, started, check, progress):
    """Write the archive the plan's ``items`` describe through ``writer`` (a MemberWriter);
    give an Assembly.

    ``stream_chunks`` is the helper's tar of the FRESH entries, in plan order;
    ``check(member)`` applies the restore's rules to every member written;
    ``snapshots`` maps paths to their ``capture.Snapshot``. Raises
    ArchiveError (from the stream or a previous member that no longer
    matches) and BackupError.
    """
    made = Assembler(writer, previous, progress)
    reader = TarReader(stream_chunks, concatenated=True, keep_headers=True)
    upcoming = [None]
    first_name_of = {}  # inode -> name, for files with more than one name

    def next_member(entry):
        """Give the stream's member for ``entry``, or None if tar did not find it (gone)."""
        if upcoming[0] is None:
            upcoming[0] = reader.next() or False
        member = upcoming[0]
        if member is False or (member.name != entry.name and
                               normalize(member.name) != entry.path):
            return None
        upcoming[0] = None
        return member

    def header_of(entry, member):
        check(member)
        if member.kind == FILE and entry.links > 1 and not entry.folder:
            first = first_name_of.setdefault(entry.inode, member.name)
            if first != member.name:  # tar's batches: its data went with the first name
                member.kind, member.linkname, member.size = HARDLINK, first, 0
                return encode_header(member.name, HARDLINK, member.mode, member.uid,
                                     member.gid, member.mtime, 0, first, member.uname,
                                     member.gname), False
        return reader.header_bytes, True  # as tar wrote it

    for kind, value in items:
        if kind == REUSE:
            made.copy(value)
            continue
        entry = value
        trusted = entry.trusted(started)
        if kind == SNAPSHOT:
            snapshot = snapshots[entry.path]
            size = os.path.getsize(snapshot.file)
            member = Member(entry.name, FILE, mode=entry.mode & 0o7777, uid=entry.uid,
                            gid=entry.gid, mtime=entry.mtime, size=size)
            check(member)
            header = encode_header(entry.name, FILE, member.mode, entry.uid, entry.gid,
                                   entry.mtime, size)
            with open(snapshot.file, "rb") as file:
                made.large(entry, header, size, iter(lambda: file.read(PIECE_SIZE), b""),
                           False)
            continue
        member = next_member(entry)
        if member is None:
            made.gone()
            continue
        header, whole = header_of(entry, member)
        if member.kind == FILE and whole and (entry.large() or member.size >= LARGE_FILE):
            made.large(entry, header, member.size, reader.data(), trusted)
            continue
        data = reader.read_data() + padding(member.size) if member.kind == FILE and whole \
            else b""
        made.small(entry, header, data, trusted and whole)
    if upcoming[0] is None:
        upcoming[0] = reader.next() or False
    if upcoming[0] is not False:
        raise BackupError("the helper's tar holds %s, which the plan does not name there"
                          % upcoming[0].name.decode("utf-8", "replace"))
    return made.finish()


class GrowingListing:
    """The helper's listing read while the helper still writes it, for a volume tarred
    while it is listed (``assemble_while_listing``).

    ``more()`` gives the listing's next bytes, waiting for them, and b"" once
    it is complete. Both walk the volume in the same order; ``entry(path)``
    gives the tar member's line, passing over lines before it (entries gone
    before tar came to them), or None for a member the next WINDOW lines do
    not hold (made after the listing passed it).
    """

    WINDOW = 256

    def __init__(self, more):
        self._written = _lines_as_written(more)
        self._window = collections.OrderedDict()  # path -> Entry, in listing order
        self._ended = False

    def _read(self):
        lines = next(self._written, None)
        if lines is None:
            self._ended = True
            return
        for line in lines:
            try:
                entry = Entry(line)
            except (ValueError, ArchiveError):
                continue  # a piece of a name with a line break: the listing has a problem
            self._window.setdefault(entry.path, entry)

    def entry(self, path):
        window = self._window
        while path not in window:
            if self._ended or len(window) >= self.WINDOW:
                return None
            self._read()
        while True:
            found_path, found = window.popitem(last=False)
            if found_path == path:
                return found


class _Unlisted:
    """A tar member the listing does not hold: never trusted, never large by its line."""

    __slots__ = ("path", "line")

    def __init__(self, path):
        self.path = self.line = path

    @staticmethod
    def large():
        return False


def assemble_while_listing(listed, stream_chunks, writer, started, check, progress):
    """Write the helper's tar of a whole volume through ``writer`` (a MemberWriter) while the
    volume is still being listed (``listed``: a GrowingListing); give an Assembly.

    For a first backup: with no previous archive nothing waits for the
    whole listing. Members are grouped, and keyed by their lines, as
    ``assemble`` does; a member without a line is read again next time.
    The listing's start (``started``) came before either read anything, so
    an entry that changed while both ran has a ctime as new as that start
    (untrusted) or a line the next listing does not repeat. ``check``
    applies the restore's rules to every member. Raises ArchiveError (from
    the stream) and BackupError.
    """
    made = Assembler(writer, None, progress)
    reader = TarReader(stream_chunks, keep_headers=True)
    while True:
        member = reader.next()
        if member is None:  # the archive's tar is busybox's stream, byte for byte
            return made.finish(reader.offset)
        check(member)  # sets member.path
        entry = listed.entry(member.path)
        trusted = entry is not None and entry.trusted(started)
        entry = entry or _Unlisted(member.path)
        if member.kind == FILE and (entry.large() or member.size >= LARGE_FILE):
            made.large(entry, reader.header_bytes, member.size, reader.data(), trusted)
        else:
            data = reader.read_data() + padding(member.size) if member.kind == FILE else b""
            made.small(entry, reader.header_bytes, data, trusted)


def forget_listing(blocks):
    """Take every listing digest out of a record's ``blocks``: the listing they came from
    turned out unusable (a name with a line break can forge a line)."""
    for saved in blocks:
        if saved[0] == "run":
            saved[6][2] = None
        elif saved[0] == "head":
            saved[6][1] = None


HELD_ENTRIES = 10000  # a plan naming more entries is made twice, not held: 740 bytes each


class HeldPlan:
    """A plan walked once for the names the helper is to tar (``names_to_tar``) and kept
    for the assembly (``items``) while it names few entries (copied runs are one item
    each): a night's plan, mostly copies, is then made once, not twice. A larger plan is
    made again for the assembly, so memory stays flat at any size. ``previous``: the
    archive it copies from."""

    def __init__(self, previous):
        self.previous = previous
        self._kept = None  # the items, once walked whole and few enough

    def names_to_tar(self, items):
        """Give the names of the FRESH entries among ``items``, in order, keeping the items."""
        kept, named = [], 0
        for item in items:
            if kept is not None and item[0] != REUSE:
                named += 1
                if named > HELD_ENTRIES:
                    kept = None
            if kept is not None:
                kept.append(item)
            if item[0] == FRESH:
                yield item[1].name
        self._kept = kept

    def items(self, make):
        """Give the plan's items: those kept, or ``make()``'s (the same plan, made anew)."""
        return iter(self._kept) if self._kept is not None else make()


def every_name(listing):
    """Give every name of the listing, in order: what ``HeldPlan.names_to_tar`` gives when
    nothing is copied, excluded or snapshotted, without taking each line apart."""
    with open(listing.path, "rb") as file:
        for line in file:
            yield line.rstrip(b"\n").split(b" ", 8)[8]




def describe(made, previous, what):
    """Give the log line of what ``assemble`` copied and wrote, or None with nothing copied."""
    if previous is None:
        return None
    return "%s: %.1f MiB copied from %s, %.1f MiB read and compressed" % (
        what, made.reused / (1 << 20), previous.path, made.written / (1 << 20))


def record(archive_path, listing, members, made_by, blocks, reporter):
    """Write ``<archive>.listing``: what skip-if-unchanged needs, and the member record
    (``blocks``: None for an archive not made from a plan)."""
    digest = checksum_of(archive_path)
    if digest is None:
        return  # without a checksum nothing could later prove the archive unchanged
    try:
        identity = archive_identity(os.stat(archive_path))
    except OSError:
        return
    text = json.dumps({
        "format": RECORD_FORMAT, "blocked": FORMAT if blocks is not None else None,
        "listing": listing.digest if listing.problem is None and not listing.racy else None,
        "archive": identity,
        "sha256": digest, "members": members, "recipe": made_by, "blocks": blocks},
        separators=(",", ":"))
    try:
        publish_text(archive_path + LISTING_SUFFIX, text + "\n")
    except BackupError as error:
        reporter.warn("%s; the next backup of it will be a full one" % error)

