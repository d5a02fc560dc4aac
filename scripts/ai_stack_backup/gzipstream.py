"""gzip in the standard library: blocked archives written on every core, read on every core.

The writers cut the stream into blocks and make each its own gzip member
(RFC 1952 allows any number of members, and every gunzip reads them as one
stream), like htslib's BGZF and eStargz. Each member's header carries an
extra field (FEXTRA, which every reader skips) with the member's whole
length, so a reader finds the next member without inflating this one and
inflates them in parallel; the same field pads a large member to a multiple
of 4096 bytes, so that members keep their place on filesystem blocks and a
later archive can share them (``copy_file_range``). zlib releases the GIL
while it works, so threads use every core.

``ParallelGzipWriter`` is a file object cutting at every 1 MiB; ``MemberWriter``
takes whole blocks (as ``blocks`` cuts them at tar member boundaries) and
byte ranges copied from an earlier archive, and says where each landed.
The decompressor checks every member's CRC-32 and length, accepts
concatenated members and trailing zero padding, and refuses everything else.
"""

import collections
import concurrent.futures
import contextlib
import hashlib
import os
import queue
import struct
import threading
import zlib

from .errors import ArchiveError

CHUNK_SIZE = 1 << 20
READ_SIZE = 1 << 20
OUTPUT_LIMIT = 1 << 20  # bounds memory for highly compressible (or hostile) input
GZIP_MAGIC = b"\x1f\x8b"
EMPTY_FINAL_BLOCK = b"\x03\x00"  # what a raw deflate stream's flush() gives with no input
DEFAULT_LEVEL = 6
UNFINISHED = GZIP_MAGIC + b"\x08"  # a member's first bytes: "the stream ends early"
PROBE_SIZE = 4096
PROBE_RATIO = 0.97  # a sample that deflate cannot shrink by 3% counts as incompressible

# The extra field: subfield "AS" holding the member's length (8 bytes, little-endian), then
# zeros as padding. 10 header bytes, XLEN, subfield id and length, the 8 bytes.
SUBFIELD_ID = b"AS"
FLAG_EXTRA = 0x04
HEADER_SIZE = 10 + 2 + 4 + 8
TRAILER_SIZE = 8
SMALLEST_MEMBER = HEADER_SIZE + len(EMPTY_FINAL_BLOCK) + TRAILER_SIZE
BLOCK_ALIGNMENT = 4096  # the filesystem block: only whole aligned blocks can be shared
ALIGN_FROM = 64 << 10  # a member this long is padded and placed on a block boundary
LARGEST_PARALLEL_MEMBER = 64 << 20  # a longer length field is read the streaming way
MEMBER_OUTPUT_LIMIT = 16 << 20  # a member inflating to more is read the streaming way


def _looks_incompressible(chunk):
    """Give True when four samples across the chunk all fail to compress (uploads, media).

    Deflating such data at level 6 costs more than text does and gains
    nothing; storing it is 15 times faster. Any compressible sample means the
    chunk is compressed as usual, so mixed chunks lose nothing.
    """
    if len(chunk) < 4 * PROBE_SIZE:
        return False
    last = len(chunk) - PROBE_SIZE
    for start in (0, last // 3, 2 * last // 3, last):
        sample = bytes(chunk[start:start + PROBE_SIZE])
        if len(zlib.compress(sample, 1)) < PROBE_SIZE * PROBE_RATIO:
            return False
    return True


def _member(deflated, crc, size, padding=0):
    extra = SUBFIELD_ID + struct.pack("<H", 8 + padding) + \
        struct.pack("<Q", HEADER_SIZE + padding + len(deflated) + TRAILER_SIZE) + bytes(padding)
    # magic, deflate, FEXTRA, mtime 0 (reproducible), no extra flags, OS = Unix
    return b"".join((GZIP_MAGIC, b"\x08\x04\x00\x00\x00\x00\x00\x03",
                     struct.pack("<H", len(extra)), extra, deflated,
                     struct.pack("<II", crc, size & 0xFFFFFFFF)))


def compress_member(level, block):
    """Give ``block`` as one gzip member with its length in the header; a member of
    ALIGN_FROM bytes or more is padded to a multiple of BLOCK_ALIGNMENT."""
    if _looks_incompressible(block):
        level = 0  # stored blocks: the same size deflate would reach, at memcpy speed
    compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    deflated = compressor.compress(block) + compressor.flush()
    length = HEADER_SIZE + len(deflated) + TRAILER_SIZE
    padding = -length % BLOCK_ALIGNMENT if length >= ALIGN_FROM else 0
    return _member(deflated, zlib.crc32(block), len(block), padding)


def filler(length):
    """Give an empty gzip member exactly ``length`` bytes long (at least SMALLEST_MEMBER): it
    moves the next member onto a block boundary and adds nothing to the stream."""
    return _member(EMPTY_FINAL_BLOCK, 0, 0, length - SMALLEST_MEMBER)


def member_length(header):
    """Give the length our extra field records in a member's first HEADER_SIZE bytes, or
    None (a member from another gzip, or too short to tell)."""
    if len(header) < HEADER_SIZE or header[:3] != GZIP_MAGIC + b"\x08" or \
            not header[3] & FLAG_EXTRA or header[12:14] != SUBFIELD_ID:
        return None
    extra_length, field_length = struct.unpack("<HH", header[10:12] + header[14:16])
    if field_length < 8 or extra_length < 4 + field_length:
        return None
    return struct.unpack("<Q", header[16:24])[0]


def member_trailer(member):
    """Give ``(crc, size)`` from a member's trailer."""
    return struct.unpack("<II", member[-TRAILER_SIZE:])


class _Ordered:
    """Work done in a pool (or inline with one thread), put out strictly in order; at most
    ``2 * threads`` pieces wait, so memory stays bounded."""

    def __init__(self, threads, put):
        self._put = put
        self._pending = collections.deque()
        self._max_pending = 2 * threads
        self._executor = (concurrent.futures.ThreadPoolExecutor(threads, "gzip")
                          if threads > 1 else None)

    def submit(self, function, *arguments, then=None):
        """Run ``function(*arguments)``; ``then(result)`` (default: ``put``) takes the result in
        order. ``then`` alone (no function: ``submit(None, then=...)``) queues a step."""
        if self._executor is None or function is None:
            item = _Done(function(*arguments) if function else None)
        else:
            item = self._executor.submit(function, *arguments)
        self._pending.append((item, then or self._put))
        while len(self._pending) > self._max_pending:
            self._take()

    def _take(self):
        item, then = self._pending.popleft()
        then(item.result())

    def drain(self):
        while self._pending:
            self._take()

    def abort(self):
        for item, _ in self._pending:
            item.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


class _Done:
    def __init__(self, value):
        self.value = value

    def result(self):
        return self.value

    def cancel(self):
        pass


def put_all(output, data):
    """Write all of ``data``: a raw file may take only part of a write (the disk filling up,
    say), so go on with the rest and never lose a piece in the middle of the stream."""
    view = memoryview(data)
    while view:
        written = output.write(view)
        view = view[len(view) if written is None else written:]


class ParallelGzipWriter:
    """A write-only file object that gzips into ``output`` with a pool of threads, one member
    per CHUNK_SIZE of input.

    ``close()`` finishes the stream; after an error, call ``abort()`` instead:
    it ends the stream with the start of a member that never comes, so that
    every gunzip reports it cut short (complete members alone would read as a
    whole stream). A worker's exception surfaces from ``write()`` or ``close()``.
    """

    def __init__(self, output, level=DEFAULT_LEVEL, threads=1):
        self.output = output
        self.level = level
        self.size = 0
        self._members = 0
        self._buffer = bytearray()
        self._work = _Ordered(threads, self._put)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _put(self, member):
        put_all(self.output, member)
        self._members += 1

    def _submit(self, chunk):
        self._work.submit(compress_member, self.level, chunk)

    def write_chunk(self, chunk):
        """Take over a full CHUNK_SIZE ``chunk`` (bytes or a bytearray the caller never
        touches again) without copying; falls back to ``write`` when not aligned."""
        if self._buffer or len(chunk) != CHUNK_SIZE:
            return self.write(chunk)
        self.size += CHUNK_SIZE
        self._submit(chunk)
        return CHUNK_SIZE

    def write(self, data):
        view = memoryview(data).cast("B")
        self.size += len(view)
        if self._buffer:
            room = CHUNK_SIZE - len(self._buffer)
            self._buffer += view[:room]
            view = view[room:]
            if len(self._buffer) < CHUNK_SIZE:
                return len(data)
            self._submit(bytes(self._buffer))
            self._buffer.clear()
        while len(view) >= CHUNK_SIZE:
            self._submit(view[:CHUNK_SIZE].tobytes())
            view = view[CHUNK_SIZE:]
        self._buffer += view
        return len(data)

    def close(self):
        """Compress what is left and wait for every member (an empty stream gets one empty
        member: it is still gzip)."""
        try:
            if self._buffer or not self.size:
                self._submit(bytes(self._buffer))
                self._buffer.clear()
            self._work.drain()
        finally:
            self._work.abort()

    def abort(self):
        """Drop pending work and mark the stream unfinished."""
        self._work.abort()
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or file: nothing to mark
            put_all(self.output, UNFINISHED)


class MemberWriter:
    """Puts gzip members into ``output`` in order: blocks compressed on ``threads`` cores,
    and members copied from an earlier archive.

    A member of ALIGN_FROM bytes or more starts on a block boundary (an empty
    ``filler`` member goes first where needed). Every member's place is
    handed, in order, to the ``placed(offset, length, crc, size, bytes_crc,
    digest, copied)`` given with it. ``output`` has ``write(data)`` and
    ``copy(source, offset, data)`` (writes ``data``, which are ``source``'s
    bytes at ``offset``, sharing them where the filesystem can).
    """

    def __init__(self, output, level=DEFAULT_LEVEL, threads=1):
        self.output = output
        self.level = level
        self.offset = 0
        self._work = _Ordered(threads, None)

    def _aligned(self, length):
        if length >= ALIGN_FROM and self.offset % BLOCK_ALIGNMENT:
            gap = -self.offset % BLOCK_ALIGNMENT
            if gap < SMALLEST_MEMBER:
                gap += BLOCK_ALIGNMENT
            put_all(self.output, filler(gap))
            self.offset += gap

    def _put(self, placed, digest, copied, member):
        """Write a finished (or copied: ``(source, offset, CRC-32 of its bytes)``) member at
        the next place; say where it went."""
        self._aligned(len(member))
        at = self.offset
        if copied is None:
            put_all(self.output, member)
            bytes_crc = zlib.crc32(member)
        else:
            self.output.copy(copied[0], copied[1], member)
            bytes_crc = copied[2]  # the copier checked the bytes against it
        self.offset += len(member)
        placed(at, len(member), *member_trailer(member), bytes_crc, digest, copied is not None)

    def compress(self, block, placed, reuse=None):
        """Compress ``block`` (whole tar members, or a piece of one file) into one member.

        With ``reuse``, a worker first takes the block's SHA-256 (``placed``
        gets it as ``digest``) and asks ``reuse(digest)`` for an equal member:
        ``(source, offset, CRC-32 of its bytes, member)`` to copy instead, or None.
        """
        def work():
            digest = None
            if reuse is not None:
                digest = hashlib.sha256(block).hexdigest()
                found = reuse(digest)
                if found is not None:
                    return digest, found[:3], found[3]
            return digest, None, compress_member(self.level, block)
        self._work.submit(work, then=lambda done: self._put(placed, *done))

    def copy(self, source, offset, bytes_crc, member, placed):
        """Put ``member``, read from ``source`` at ``offset`` and checked against the CRC-32
        of its bytes ``bytes_crc``, as it is."""
        self._work.submit(None, then=lambda _: self._put(placed, None,
                                                         (source, offset, bytes_crc), member))

    def close(self):
        try:
            self._work.drain()
        finally:
            self.abort()

    def abort(self):
        self._work.abort()


def _zlib_problem(error):
    """Give the ArchiveError for a zlib error; zlib tells its cases apart only in words."""
    text = str(error)
    if "incorrect data check" in text:
        return ArchiveError("gzip CRC-32 mismatch (the data is corrupt)", "gzip-crc")
    if "incorrect length check" in text:
        return ArchiveError("gzip length mismatch (the data is corrupt)", "gzip-length")
    if "incorrect header check" in text or "unknown compression method" in text:
        return ArchiveError("not a gzip file", "not-gzip")
    return ArchiveError("corrupt gzip data (%s)" % text, "gzip-corrupt")


def _inflate(member):
    """Give a whole member's content (None: it inflates to more than MEMBER_OUTPUT_LIMIT, to
    be read the streaming way); raises ArchiveError."""
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        output = decompressor.decompress(member, MEMBER_OUTPUT_LIMIT)
    except zlib.error as error:
        raise _zlib_problem(error)
    if decompressor.unconsumed_tail:
        return None
    if not decompressor.eof or decompressor.unused_data:
        raise ArchiveError("a gzip member does not end where its header says it does (the "
                           "data is corrupt)", "gzip-corrupt")
    return output


def _stream_member(decompressor, data, read):
    """Inflate one member the streaming way; yield its output in pieces of at most
    OUTPUT_LIMIT, then give (by StopIteration) what follows it in ``data``."""
    while True:
        try:
            while True:
                output = decompressor.decompress(data, OUTPUT_LIMIT)
                if output:
                    yield output
                data = decompressor.unconsumed_tail
                if decompressor.eof or (not data and len(output) < OUTPUT_LIMIT):
                    break
        except zlib.error as error:
            raise _zlib_problem(error)
        if decompressor.eof:
            return decompressor.unused_data
        data = read(READ_SIZE)
        if not data:
            raise ArchiveError("the archive is truncated (the gzip stream ends early)", "truncated")


def _read_until(data, size, read):
    """Give ``data`` with more read until it has ``size`` bytes (fewer only at the end)."""
    if len(data) >= size:
        return data
    parts = [data]
    have = len(data)
    while have < size:
        more = read(max(READ_SIZE, size - have))
        if not more:
            break
        parts.append(more)
        have += len(more)
    return b"".join(parts)


def _given(ready):
    """Yield the content of the members inflated so far, in order."""
    while ready:
        output, member = ready.popleft()
        if output is None:  # too large to hold: inflated again, as it streams
            yield from _stream_member(zlib.decompressobj(16 + zlib.MAX_WBITS), member,
                                      lambda size: b"")
        elif output:
            yield output


def iter_gunzip(read, threads=None):
    """Yield the decompressed bytes of a gzip stream read with ``read(size)``.

    Members whose header records their length (ours) are inflated on
    ``threads`` cores (default: all) and given in order; any other member is
    inflated as it streams. Raises ArchiveError for an empty input, data that
    is not gzip, a CRC-32 or length mismatch in any member, truncation, or
    trailing bytes that are neither another gzip member nor zero padding.
    """
    data = read(READ_SIZE)
    if not data:
        raise ArchiveError("the archive is empty", "empty")
    data = _read_until(data, 2, read)
    if data[:2] != GZIP_MAGIC:
        raise ArchiveError("not a gzip file", "not-gzip")
    if threads is None:
        threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else os.cpu_count() or 1
    ready = collections.deque()
    work = _Ordered(threads, ready.append)
    try:
        while True:
            data = _read_until(data, HEADER_SIZE, read)
            length = member_length(data[:HEADER_SIZE])
            if length is not None and SMALLEST_MEMBER <= length <= LARGEST_PARALLEL_MEMBER:
                data = _read_until(data, length, read)
                if len(data) < length:
                    raise ArchiveError("the archive is truncated (the gzip stream ends early)",
                                       "truncated")
                member, data = data[:length], data[length:]
                work.submit(_inflate, member, then=lambda output, member=member: ready.append(
                    (output, member)))
                yield from _given(ready)
            else:
                work.drain()
                yield from _given(ready)
                data = yield from _stream_member(zlib.decompressobj(16 + zlib.MAX_WBITS),
                                                 data, read)
            data = _read_until(data, 2, read)
            if not data:
                break
            if data[:2] == GZIP_MAGIC:  # another member, as gzip(1) allows
                continue
            work.drain()  # a member before this point that failed is the first problem
            while data:
                if data.count(0) != len(data):
                    raise ArchiveError("trailing garbage after the gzip data", "trailing-data")
                data = read(READ_SIZE)
            break
        work.drain()
        yield from _given(ready)
    finally:
        work.abort()


def prefetched(iterable, depth=4):
    """Yield the items of ``iterable`` while a thread already produces the next ones.

    For ``iter_gunzip``: zlib releases the GIL while it inflates, so the
    caller's parsing overlaps the decompression. At most ``depth`` items wait.
    An exception in the producer is raised here; leaving early stops it.
    """
    items = queue.Queue(depth)
    stopping = threading.Event()

    def put(entry):
        while not stopping.is_set():
            try:
                items.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in iterable:
                if not put((True, item)):
                    return
            put((False, None))
        except BaseException as error:  # handed to the consumer, who raises it
            put((False, error))

    producer = threading.Thread(target=produce, name="gunzip", daemon=True)
    producer.start()
    try:
        while True:
            more, item = items.get()
            if not more:
                if item is not None:
                    raise item
                return
            yield item
    finally:
        stopping.set()
        producer.join()
