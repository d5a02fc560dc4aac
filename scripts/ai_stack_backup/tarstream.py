"""Reading, checking and writing tar streams.

``TarReader`` parses a tar stream itself (ustar, GNU long names, pax records,
base-256 numbers) so that end-of-archive, truncation and trailing data are
decided exactly and the same way on every Python version. ``ArchiveRules``
applies the restore safety rules to each member by string alone, never by
looking at a disk. ``member_header`` re-emits a checked member in one plain
format (GNU tar headers, exactly as ``tarfile`` writes them) for busybox tar,
so that the helper extracts exactly what was checked.
"""

import array
import hashlib
import json
import os
import re
import struct
from zlib import adler32

from .errors import ArchiveError

BLOCK_SIZE = 512
ZERO_BLOCK = bytes(BLOCK_SIZE)
END_OF_ARCHIVE = bytes(2 * BLOCK_SIZE)
MAX_OWNER = 2 ** 32 - 2  # (uid_t) -1 means "unchanged" to chown
EXTENDED_HEADER_LIMIT = 1 << 20  # GNU long names and pax records larger than this are hostile

# Member kinds. The path table stores them in 3 bits, so they stay below 8.
FILE, DIRECTORY, SYMLINK, FIFO, HARDLINK, CHAR_DEVICE, BLOCK_DEVICE = range(1, 8)
KIND_NAMES = {FILE: "regular file", DIRECTORY: "directory", SYMLINK: "symlink", FIFO: "FIFO",
              HARDLINK: "hard link", CHAR_DEVICE: "character device",
              BLOCK_DEVICE: "block device"}
_KIND_BY_TYPEFLAG = {b"0": FILE, b"\0": FILE, b"7": FILE, b"1": HARDLINK, b"2": SYMLINK,
                     b"3": CHAR_DEVICE, b"4": BLOCK_DEVICE, b"5": DIRECTORY, b"6": FIFO}

_POSIX_MAGIC = b"ustar\x0000"
_DECIMAL = re.compile(rb"-?[0-9]+")
_PAX_TIME = re.compile(rb"(-?[0-9]+)(?:\.[0-9]*)?")
_PAX_RECORD = re.compile(rb"([0-9]+) ([^=\n]+)=")
_SIGNED_SUM = struct.Struct("148b8x356b")
# name, mode, uid, gid, mtime, linkname, magic and version, uname, gname, prefix (the size
# and the type flag are read before, the device numbers only for devices)
_HEADER_FIELDS = struct.Struct("100s8s8s8s12x12s8x1x100s8s32s32s16x155s12x")


def show(name):
    """Give a member name (bytes) quoted for a message, control characters escaped."""
    return json.dumps(name.decode("utf-8", "backslashreplace"), ensure_ascii=False)


class Member:
    """One archive member as the tar stream describes it.

    ``name`` and ``linkname`` are the raw bytes; ``path`` and ``link_path`` are
    set by ``ArchiveRules.check`` (normalised, no ``./``, ``b""`` for the root).
    """

    __slots__ = ("name", "kind", "mode", "uid", "gid", "mtime", "size", "linkname",
                 "uname", "gname", "devmajor", "devminor", "path", "link_path")

    def __init__(self, name, kind, mode=0o644, uid=0, gid=0, mtime=0, size=0, linkname=b"",
                 uname=b"", gname=b"", devmajor=0, devminor=0):
        self.name, self.kind, self.mode, self.uid, self.gid = name, kind, mode, uid, gid
        self.mtime, self.size, self.linkname = mtime, size, linkname
        self.uname, self.gname, self.devmajor, self.devminor = uname, gname, devmajor, devminor
        self.path = self.link_path = None


# --- reading ----------------------------------------------------------------

class _ChunkStream:
    """Exact-size reads over an iterator of byte chunks; ``offset`` counts bytes consumed."""

    def __init__(self, chunks):
        self._chunks = iter(chunks)
        self._buffer = b""
        self._position = 0
        self.offset = 0

    def _refill(self):
        for chunk in self._chunks:
            if chunk:
                self._buffer = chunk
                self._position = 0
                return True
        return False

    def read(self, size):
        """Give ``size`` bytes, or fewer only at the end of the stream."""
        end = self._position + size
        if end <= len(self._buffer):
            data = bytes(self._buffer[self._position:end])  # chunks may be bytearrays
            self._position = end
            self.offset += size
            return data
        parts = [self._buffer[self._position:]]
        missing = size - len(parts[0])
        self._buffer, self._position = b"", 0
        while missing and self._refill():
            piece = self._buffer[:missing]
            self._position = len(piece)
            parts.append(piece)
            missing -= len(piece)
        data = b"".join(parts)
        self.offset += len(data)
        return data

    def read_ahead_ends(self):
        """Say whether the stream has ended (nothing more to read)."""
        return self._position >= len(self._buffer) and not self._refill()

    def pieces(self, size):
        """Yield memoryviews that together are the next ``size`` bytes; raises ArchiveError."""
        while size:
            if self._position >= len(self._buffer) and not self._refill():
                raise ArchiveError("the archive is truncated inside a member's data", "truncated")
            take = min(size, len(self._buffer) - self._position)
            yield memoryview(self._buffer)[self._position:self._position + take]
            self._position += take
            self.offset += take
            size -= take

    def skip(self, size):
        """Consume ``size`` bytes; raises ArchiveError at the end of the stream."""
        if self._position + size <= len(self._buffer):
            self._position += size
            self.offset += size
            return
        for _ in self.pieces(size):
            pass


_NUMBERS = {}  # field bytes -> value: modes, owners and sizes repeat from member to member
_NUMBERS_KEPT = 4096


def _number(field, what, offset):
    """Give the value of a numeric header field (octal or GNU base-256); raises ArchiveError."""
    value = _NUMBERS.get(field)
    if value is None:
        value = _parse_number(field, what, offset)
        if len(_NUMBERS) >= _NUMBERS_KEPT:
            _NUMBERS.clear()
        _NUMBERS[field] = value
    return value


def _parse_number(field, what, offset):
    if field[0] & 0x80:
        if field[0] in (0x80, 0xFF):
            return int.from_bytes(field, "big", signed=True) if field[0] == 0xFF \
                else int.from_bytes(field[1:], "big")
    else:
        text = field.split(b"\0", 1)[0].strip(b" ")
        if text.isdigit():  # ASCII digits only: no sign, underscore or 0o prefix
            try:
                return int(text, 8)
            except ValueError:  # an 8 or a 9
                pass
        elif not text:
            return 0
    raise ArchiveError("invalid %s field in the tar header at byte %d" % (what, offset),
                       "bad-number")


def _string(field):
    return field.split(b"\0", 1)[0]


def _parse_pax(data, offset):
    """Give the records of a pax extended header as a dict of bytes; raises ArchiveError."""
    records = {}
    position = 0
    while position < len(data):
        if data.count(0, position) == len(data) - position:
            break  # NUL padding after the last record
        match = _PAX_RECORD.match(data, position)
        if not match:
            raise ArchiveError("malformed pax header at byte %d" % offset, "bad-pax")
        length = int(match.group(1))
        end = position + length
        if length <= match.end() - position or end > len(data) or data[end - 1] != 0x0A:
            raise ArchiveError("malformed pax record at byte %d" % offset, "bad-pax")
        records[match.group(2)] = data[match.end():end - 1]
        position = end
    return records


def _pax_integer(records, key, offset, pattern=_DECIMAL):
    value = records.get(key)
    if value is None:
        return None
    match = pattern.fullmatch(value)
    if not match:
        raise ArchiveError("invalid pax %s record at byte %d" % (key.decode(), offset), "bad-pax")
    return int(match.group(1) if match.groups() else match.group(0))


def _data_size(size, records, offset):
    """Give a member's data size: the pax ``size`` record wins over the header field."""
    pax_size = _pax_integer(records, b"size", offset)
    if pax_size is not None:
        size = pax_size
    if size < 0:
        raise ArchiveError("negative size in the tar header at byte %d" % offset, "negative-size")
    return size


def _byte_sum(block):
    """The sum of a 512-byte block's bytes, from two Adler-32s: the low half of one is 1 +
    the sum of its bytes modulo 65521, and 256 bytes never sum past 65280, so each half's
    is exact; ten times faster than sum(), on every header read or written."""
    view = memoryview(block)
    return (adler32(view[:256]) & 0xFFFF) + (adler32(view[256:]) & 0xFFFF) - 2


def _check_sum(block, offset):
    """Raise ArchiveError unless the header's checksum (unsigned, or the signed sum some old
    tars wrote) matches."""
    try:
        stored = _number(block[148:156], "checksum", offset)
    except ArchiveError:
        stored = None
    unsigned = _byte_sum(block) - sum(block[148:156]) + 8 * 32
    if stored != unsigned and stored != sum(_SIGNED_SUM.unpack(block)) + 8 * 32:
        if offset == 0:
            raise ArchiveError("not a tar archive (bad header checksum)", "not-tar")
        raise ArchiveError("corrupt tar header at byte %d (checksum mismatch)" % offset,
                           "bad-checksum")


def _merge_pax(target, payload, offset):
    """Merge a pax header's records into ``target`` (an empty value removes a record)."""
    records = _parse_pax(payload, offset)
    if any(key.startswith(b"GNU.sparse") for key in records):
        raise ArchiveError("sparse members are not supported (pax header at byte %d)" % offset,
                           "sparse")
    for key, value in records.items():
        if value:
            target[key] = value
        else:
            target.pop(key, None)


class TarReader:
    """Parse a tar stream from an iterator of byte chunks.

    Iterating gives ``Member`` objects (with ``light``, just ``True`` for each
    member: the structure is checked as fully, but nothing a walk does not
    need is decoded); ``data()`` gives the current member's
    content as memoryviews (skipped if not read). Iteration ends only at a
    proper end-of-archive (two zero blocks) followed by nothing but zeros up to
    the end of the input. Raises ArchiveError for anything else: a bad header
    checksum, truncation (also exactly at a member boundary), unsupported
    member types, malformed extended headers, trailing data. With
    ``concatenated``, several tar streams follow each other and the input may
    end after any of their end-of-archive markers.
    """

    def __init__(self, chunks, light=False, concatenated=False, keep_headers=False):
        self._stream = _ChunkStream(chunks)
        self._light = light
        # The header blocks of the last member as they came (extended headers included),
        # for a writer that passes members on unchanged.
        self._keep_headers = keep_headers
        self.header_bytes = b""
        # Several tar streams one after another (one per ``xargs`` batch): zero blocks
        # between members are skipped and the input may end after any of them.
        self._concatenated = concatenated
        self._between = concatenated
        self._unread = 0
        self._padding = 0
        self._global = {}
        self.members = 0
        self.data_bytes = 0

    @property
    def offset(self):
        return self._stream.offset

    def __iter__(self):
        while True:
            member = self.next()
            if member is None:
                return
            yield member

    def data(self):
        """Yield the current member's data as memoryviews; what is not taken is skipped."""
        for piece in self._stream.pieces(self._unread):
            yield piece
            # Counted once the taker is back, so a taker that stops early leaves it unread.
            self._unread -= len(piece)

    def read_data(self):
        """Give the current member's whole data as bytes (for members known to be small)."""
        data = self._stream.read(self._unread)
        if len(data) < self._unread:
            raise ArchiveError("the archive is truncated inside a member's data", "truncated")
        self._unread = 0
        return data

    def _skip_rest(self):
        if self._unread or self._padding:
            self._stream.skip(self._unread + self._padding)
            self._unread = self._padding = 0

    def _read_header(self):
        offset = self._stream.offset
        block = self._stream.read(BLOCK_SIZE)
        if not block:
            raise ArchiveError("the archive is truncated: no end-of-archive marker after %d "
                               "members" % self.members, "truncated")
        if len(block) < BLOCK_SIZE:
            raise ArchiveError("the archive is truncated inside a tar header at byte %d" % offset,
                               "truncated")
        return offset, block

    def _check_end(self, offset):
        second = self._stream.read(BLOCK_SIZE)
        if second != ZERO_BLOCK:
            if len(second) < BLOCK_SIZE and not second.strip(b"\0"):
                raise ArchiveError("the archive is truncated inside its end-of-archive marker",
                                   "truncated")
            raise ArchiveError("a lone zero block at byte %d is not a valid end of archive"
                               % offset, "lone-zero-block")
        while True:
            rest = self._stream.read(1 << 20)
            if not rest:
                return
            if rest.count(0) != len(rest):
                raise ArchiveError("data follows the end-of-archive marker at byte %d" % offset,
                                   "trailing-data")

    def next(self):
        """Give the next member, or None at a valid end of archive; raises ArchiveError.

        Extended headers (GNU long names and links, pax records) come before the
        member they describe and are gathered until it comes.
        """
        self._skip_rest()
        long_name = long_link = None
        local = {}
        raw = [] if self._keep_headers else None
        while True:
            if self._between and self._stream.read_ahead_ends():
                return None
            offset, block = self._read_header()
            if block == ZERO_BLOCK and self._concatenated and long_name is None and \
                    long_link is None and not local:
                self._between = True
                continue
            if raw is not None:
                raw.append(block)
            self._between = False
            if block == ZERO_BLOCK:
                if long_name is not None or long_link is not None or local:
                    raise ArchiveError("an extended header at byte %d has no member" % offset,
                                       "orphan-extended-header")
                self._check_end(offset)
                return None
            _check_sum(block, offset)
            typeflag = block[156:157]
            size = _number(block[124:136], "size", offset)
            if typeflag not in (b"L", b"K", b"x", b"g"):
                break
            payload = self._extended_payload(size, offset, raw)
            if typeflag == b"L":
                long_name = payload.rstrip(b"\0")
            elif typeflag == b"K":
                long_link = payload.rstrip(b"\0")
            else:
                _merge_pax(self._global if typeflag == b"g" else local, payload, offset)
        records = {**self._global, **local} if self._global else local
        if raw is not None:
            self.header_bytes = b"".join(raw)
        if self._light:
            return self._walk_member(typeflag, size, offset, records)
        return self._member(block, typeflag, size, offset, long_name, long_link, records)

    def _extended_payload(self, size, offset, raw=None):
        if not 0 <= size <= EXTENDED_HEADER_LIMIT:
            raise ArchiveError("an extended header at byte %d is too large (%d bytes)"
                               % (offset, size), "extended-header-too-large")
        payload = self._stream.read(size)
        if len(payload) < size:
            raise ArchiveError("the archive is truncated inside an extended header",
                               "truncated")
        filling = self._stream.read(-size % BLOCK_SIZE)
        if raw is not None:
            raw += (payload, filling)
        return payload

    def _walk_member(self, typeflag, size, offset, records):
        if typeflag not in _KIND_BY_TYPEFLAG:
            raise ArchiveError("member type %r at byte %d is not supported"
                               % (typeflag.decode("latin-1"), offset), "unsupported-type")
        size = _data_size(size, records, offset)
        self._unread = size
        self._padding = -size % BLOCK_SIZE
        self.members += 1
        self.data_bytes += size
        return True

    def _member(self, block, typeflag, size, offset, long_name, long_link, records):
        kind = _KIND_BY_TYPEFLAG.get(typeflag)
        if kind is None:
            raise ArchiveError("member type %r at byte %d is not supported"
                               % (typeflag.decode("latin-1"), offset), "unsupported-type")
        # One unpack, and the cache of numeric fields looked up here: this runs for every
        # member of every archive, 200,000 times for a volume of small files.
        name, mode, uid, gid, mtime, linkname, magic, uname, gname, prefix = \
            _HEADER_FIELDS.unpack(block)
        name = name.split(b"\0", 1)[0]
        if magic == _POSIX_MAGIC:
            prefix = prefix.split(b"\0", 1)[0]
            if prefix:
                name = prefix + b"/" + name
        if long_name is not None:
            name = long_name
        linkname = long_link if long_link is not None else linkname.split(b"\0", 1)[0]
        uname, gname = uname.split(b"\0", 1)[0], gname.split(b"\0", 1)[0]
        if records:
            name = records.get(b"path", name)
            linkname = records.get(b"linkpath", linkname)
            uname, gname = records.get(b"uname", uname), records.get(b"gname", gname)
        if kind == FILE and typeflag == b"\0" and name.endswith(b"/"):
            kind = DIRECTORY  # old tars mark folders only by the slash
        size = _data_size(size, records, offset) if records else size
        if size < 0:
            raise ArchiveError("negative size in the tar header at byte %d" % offset,
                               "negative-size")
        if kind != FILE and size:
            raise ArchiveError("the %s %s at byte %d carries data" % (KIND_NAMES[kind], show(name),
                                                                       offset), "data-on-non-file")
        # The cache's get, not _number: no call for the values seen before. (Never "in" and
        # then [], which another thread's clearing of the cache could come between.)
        cached = _NUMBERS.get
        if records:  # a pax record wins over its field, which is then never read
            found = _pax_integer(records, b"uid", offset)
            uid = _number(uid, "uid", offset) if found is None else found
            found = _pax_integer(records, b"gid", offset)
            gid = _number(gid, "gid", offset) if found is None else found
            found = _pax_integer(records, b"mtime", offset, _PAX_TIME)
            mtime = _number(mtime, "mtime", offset) if found is None else found
        else:
            value = cached(uid)
            uid = _number(uid, "uid", offset) if value is None else value
            value = cached(gid)
            gid = _number(gid, "gid", offset) if value is None else value
            value = cached(mtime)
            mtime = _number(mtime, "mtime", offset) if value is None else value
        value = cached(mode)
        mode = _number(mode, "mode", offset) if value is None else value
        member = Member(name, kind, mode & 0o7777, uid, gid, mtime, size, linkname, uname, gname)
        if uid < 0 or gid < 0:
            raise ArchiveError("negative owner for %s at byte %d" % (show(name), offset),
                               "negative-owner")
        if kind in (CHAR_DEVICE, BLOCK_DEVICE):
            member.devmajor = _number(block[329:337], "devmajor", offset)
            member.devminor = _number(block[337:345], "devminor", offset)
        self._unread = size
        self._padding = -size % BLOCK_SIZE
        self.members += 1
        self.data_bytes += size
        return member


# --- safety rules -----------------------------------------------------------

class _PathTable:
    """path -> member kind, in 8 bytes a path, for any number of members.

    Paths are stored as 61-bit keyed BLAKE2 fingerprints in an open-addressing
    table (a random key per table, so no archive can aim at a collision).
    """

    def __init__(self):
        self._key = os.urandom(16)
        self._slots = array.array("Q", bytes(8 * 1024))
        self._mask = 1023
        self._count = 0

    def _fingerprint(self, path):
        digest = hashlib.blake2b(path, digest_size=8, key=self._key).digest()
        return (int.from_bytes(digest, "little") & ~7) or 8

    def _find(self, fingerprint):
        index = (fingerprint >> 3) & self._mask
        while True:
            slot = self._slots[index]
            if slot == 0 or slot & ~7 == fingerprint:
                return index
            index = (index + 1) & self._mask

    def get(self, path):
        slot = self._slots[self._find(self._fingerprint(path))]
        return slot & 7 if slot else None

    def put(self, path, kind):
        """Record ``path`` as ``kind``; give the kind it had before, or None."""
        fingerprint = self._fingerprint(path)
        index = self._find(fingerprint)
        previous = self._slots[index]
        if not previous:
            self._count += 1
        self._slots[index] = fingerprint | kind
        if 2 * self._count > len(self._slots):
            old = self._slots
            self._slots = array.array("Q", bytes(16 * len(old)))
            self._mask = len(self._slots) - 1
            for slot in old:
                if slot:
                    self._slots[self._find(slot & ~7)] = slot
        return previous & 7 if previous else None


def normalize(name, what="member"):
    """Give ``name`` without ``./`` and repeated slashes (``b""``: the root); raises ArchiveError.

    Refuses empty names, NUL bytes, absolute names and ``..`` components.
    """
    if not name:
        raise ArchiveError("a %s has an empty name" % what, "empty-name")
    if b"\0" in name:
        raise ArchiveError("the %s %s contains a NUL byte" % (what, show(name)), "nul-byte")
    if name.startswith(b"/"):
        raise ArchiveError("the %s %s has an absolute name" % (what, show(name)), "absolute-name")
    stripped = name
    while stripped.startswith(b"./"):
        stripped = stripped[2:]
    stripped = stripped.rstrip(b"/")
    parts = stripped.split(b"/")
    if b".." in parts:
        raise ArchiveError("the %s %s has a '..' component" % (what, show(name)), "dotdot")
    if b"" in parts or b"." in parts:
        return b"/".join(part for part in parts if part not in (b"", b"."))
    return stripped


class ArchiveRules:
    """The restore safety rules, applied member by member in archive order.

    A member is refused when it: has an empty, absolute or NUL-containing name
    or a ``..`` component; is a character or block device; has an owner no
    Linux system has (uid or gid above 2^32 - 2); passes through a symlink
    (or any non-folder) an earlier member created; is a hard link whose
    target is not an earlier regular file, symlink or FIFO; changes the type
    of a path an earlier member created; repeats a path that is not a folder;
    makes the root anything but a folder. Backup, verify and restore all
    apply these same rules, so what one accepts the others accept.
    """

    def __init__(self):
        self._kinds = _PathTable()
        # The last parent folder found sound. A folder can never change type later
        # (that is refused), so members in the same folder need not check it again.
        self._sound_parent = None

    def check(self, member):
        """Set ``member.path`` (and ``link_path``) or raise ArchiveError naming the member."""
        path = normalize(member.name)
        kind = member.kind
        if kind in (CHAR_DEVICE, BLOCK_DEVICE):
            raise ArchiveError("the member %s is a %s; device files are refused"
                               % (show(member.name), KIND_NAMES[kind]), "device-file")
        if member.uid > MAX_OWNER or member.gid > MAX_OWNER:
            raise ArchiveError("the member %s has the owner %d:%d, which no Linux system has"
                               % (show(member.name), member.uid, member.gid), "owner-range")
        if not path:
            if kind != DIRECTORY:
                raise ArchiveError("the member %s would make the root a %s"
                                   % (show(member.name), KIND_NAMES[kind]), "root-not-folder")
            member.path = path
            return
        parent_path = path.rpartition(b"/")[0]
        parent = b""
        for part in path.split(b"/")[:-1] if parent_path != self._sound_parent else ():
            parent = parent + b"/" + part if parent else part
            existing = self._kinds.get(parent)
            if existing is None:
                self._kinds.put(parent, DIRECTORY)
            elif existing == SYMLINK:
                raise ArchiveError("the member %s passes through the symlink %s that an earlier "
                                   "member created" % (show(member.name), show(parent)),
                                   "through-symlink")
            elif existing != DIRECTORY:
                raise ArchiveError("the member %s uses %s as a folder, but an earlier member made "
                                   "it a %s" % (show(member.name), show(parent),
                                                KIND_NAMES[existing]), "through-non-folder")
        self._sound_parent = parent_path
        recorded = kind
        if kind == HARDLINK:
            target = normalize(member.linkname, "hard link target")
            recorded = self._kinds.get(target) if target != path else None
            if recorded not in (FILE, SYMLINK, FIFO):
                raise ArchiveError("the hard link %s points to %s, which is not an earlier "
                                   "regular file, symlink or FIFO of the archive"
                                   % (show(member.name), show(member.linkname)), "hardlink-target")
            member.link_path = target
        existing = self._kinds.put(path, recorded)
        if existing is not None and existing != recorded:
            raise ArchiveError("the member %s changes a %s an earlier member created into a %s"
                               % (show(member.name), KIND_NAMES[existing], KIND_NAMES[kind]),
                               "type-change")
        if existing is not None and kind != DIRECTORY:
            # busybox creates links only after the whole stream and cannot replace a name
            # by then, so a second entry for a non-folder could not be extracted faithfully.
            raise ArchiveError("the member %s appears a second time (only folders may)"
                               % show(member.name), "repeated-member")
        if kind == SYMLINK:
            if not member.linkname or b"\0" in member.linkname:
                raise ArchiveError("the symlink %s has an empty or NUL-containing target"
                                   % show(member.name), "symlink-target")
        member.path = path


# --- writing ----------------------------------------------------------------

def _octal(value, width):
    """A numeric field as tarfile writes it in GNU format: octal with a NUL, else base-256."""
    if 0 <= value < 8 ** (width - 1):
        return b"%0*o\0" % (width - 1, value)
    if 0 <= value < 256 ** (width - 1):
        return b"\x80" + value.to_bytes(width - 1, "big")
    if -256 ** (width - 1) <= value < 0:  # two's complement; the first byte is 0xff
        return (256 ** width + value).to_bytes(width, "big")
    raise ArchiveError("the value %d does not fit a tar header" % value, "too-large-value")


_LONG_LINK = b"././@LongLink".ljust(100, b"\0")
_TYPEFLAG = {FILE: b"0", DIRECTORY: b"5", SYMLINK: b"2", FIFO: b"6", HARDLINK: b"1",
             CHAR_DEVICE: b"3", BLOCK_DEVICE: b"4"}


_OCTAL_FIELDS = b"%07o\0%07o\0%07o\0%011o\0%011o\0"  # mode, uid, gid, size, mtime


_TAILS = {}  # (typeflag, uname, gname) -> the header from its typeflag on, with its byte sum


def _tail(typeflag, linkname, uname, gname):
    """Give the header's bytes from the typeflag on, and their sum. Without a link target
    they are the same for every member of a kind and owner: those are made once."""
    key = None if linkname else (typeflag, uname, gname)
    found = _TAILS.get(key)
    if found is None:
        tail = b"".join((typeflag, linkname.ljust(100, b"\0"), b"ustar  \0",
                         uname[:32].ljust(32, b"\0"), gname[:32].ljust(32, b"\0"),
                         bytes(183)))  # device numbers (never written: no devices) and padding
        found = tail, _byte_sum(bytes(156) + tail)
        if key is not None and len(_TAILS) < 1024:
            _TAILS[key] = found
    return found


def _header_block(name, typeflag, mode, uid, gid, size, mtime, linkname, uname=b"",
                  gname=b""):
    if 0 <= mode < 0o10000000 and 0 <= uid < 0o10000000 and 0 <= gid < 0o10000000 and \
            0 <= size < 0o100000000000 and 0 <= mtime < 0o100000000000:  # all octal: one format
        numbers = _OCTAL_FIELDS % (mode, uid, gid, size, mtime)
    else:
        numbers = b"".join((_octal(mode, 8), _octal(uid, 8), _octal(gid, 8), _octal(size, 12),
                            _octal(mtime, 12)))
    head = name.ljust(100, b"\0") + numbers
    tail, tail_sum = _tail(typeflag, linkname, uname, gname)
    # 148 bytes never sum past 65521: Adler-32's low half is then 1 + their sum, exactly.
    # The checksum field itself counts as eight spaces.
    checksum = (adler32(head) & 0xFFFF) - 1 + 8 * 32 + tail_sum
    return head + b"%06o\0 " % checksum + tail


def _long_record(typeflag, value):
    data = value + b"\0"
    return (_header_block(_LONG_LINK, typeflag, 0, 0, 0, len(data), 0, b"")
            + data + bytes(-len(data) % BLOCK_SIZE))


def encode_header(name, kind, mode, uid, gid, mtime, size=0, linkname=b"", uname=b"",
                  gname=b""):
    """Give the GNU-format header blocks of one member (all text as bytes).

    Byte for byte what ``tarfile.TarInfo.tobuf(GNU_FORMAT)`` of Python 3.9+
    writes (the tests hold it to that), ten times faster: long names and link
    targets become GNU long-name records, numbers too large for octal become
    base-256, names stay their original bytes.
    """
    records = b""
    if len(linkname) > 100:
        records += _long_record(b"K", linkname)
    if len(name) > 100:
        records += _long_record(b"L", name)
    return records + _header_block(name[:100], _TYPEFLAG[kind], mode, uid, gid, size, mtime,
                                   linkname[:100], uname, gname)


def member_header(member):
    """Give the header blocks re-emitting a checked member as ``./<path>``, numeric owners only."""
    name = b"./" + member.path
    if member.kind == DIRECTORY:
        name += b"/"
    if member.kind == HARDLINK:
        linkname = b"./" + member.link_path
    elif member.kind == SYMLINK:
        linkname = member.linkname
    else:
        linkname = b""
    return encode_header(name, member.kind, member.mode, member.uid, member.gid, member.mtime,
                         member.size if member.kind == FILE else 0, linkname)


def padding(size):
    """Give the zero bytes that pad ``size`` bytes of member data to a whole block."""
    return bytes(-size % BLOCK_SIZE)
