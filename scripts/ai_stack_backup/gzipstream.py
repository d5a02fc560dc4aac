"""gzip in the standard library: a parallel compressor and a strict decompressor.

The compressor works like pigz: the input is cut into chunks of 1 MiB, each is
deflated by its own compressor primed with the last 32 KiB of the previous chunk
(so the ratio stays that of one stream) and ended with a sync flush; one writer
puts the pieces out in order, keeps the CRC-32 and length, and closes the stream
with an empty final block and the gzip trailer. The result is a single ordinary
gzip member. zlib releases the GIL while it works, so threads use every core.

The decompressor checks every member's CRC-32 and length, accepts concatenated
members and trailing zero padding, and refuses everything else.
"""

import collections
import concurrent.futures
import queue
import struct
import threading
import zlib

from .errors import ArchiveError

CHUNK_SIZE = 1 << 20
DICTIONARY_SIZE = 32 * 1024
READ_SIZE = 1 << 20
OUTPUT_LIMIT = 1 << 20  # bounds memory for highly compressible (or hostile) input
GZIP_MAGIC = b"\x1f\x8b"
EMPTY_FINAL_BLOCK = b"\x03\x00"  # what a raw deflate stream's flush() gives with no input
DEFAULT_LEVEL = 6
PROBE_SIZE = 4096
PROBE_RATIO = 0.97  # a sample that deflate cannot shrink by 3% counts as incompressible


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


def _deflate_chunk(level, chunk, dictionary):
    """Give ``chunk`` as raw deflate data ending on a byte boundary (sync flush)."""
    if _looks_incompressible(chunk):
        level = 0  # stored blocks: the same size deflate would reach, at memcpy speed
    if dictionary:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS,
                                      zlib.DEF_MEM_LEVEL, zlib.Z_DEFAULT_STRATEGY, dictionary)
    else:
        compressor = zlib.compressobj(level, zlib.DEFLATED, -zlib.MAX_WBITS)
    return compressor.compress(chunk) + compressor.flush(zlib.Z_SYNC_FLUSH)


class ParallelGzipWriter:
    """A write-only file object that gzips into ``output`` with a pool of threads.

    ``close()`` finishes the stream; after an error, call ``abort()`` instead so
    that no trailer is written and the output never looks complete. At most
    ``2 * threads`` chunks are in flight. A worker's exception surfaces from
    ``write()`` or ``close()``.
    """

    def __init__(self, output, level=DEFAULT_LEVEL, threads=1):
        self.output = output
        self.level = level
        self.crc = 0
        self.size = 0
        self._buffer = bytearray()
        self._dictionary = b""
        self._pending = collections.deque()
        self._max_pending = 2 * threads
        self._executor = (concurrent.futures.ThreadPoolExecutor(threads, "gzip")
                          if threads > 1 else None)
        extra_flags = 2 if level == 9 else 4 if level == 1 else 0
        # magic, deflate, no flags, mtime 0 (reproducible), extra flags, OS = Unix
        self._put(GZIP_MAGIC + b"\x08\x00" + b"\x00\x00\x00\x00" + bytes((extra_flags, 3)))

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, traceback):
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def _put(self, data):
        # A raw file may take only part of a write (the disk filling up, say): go on
        # with the rest, so that no piece in the middle of the stream is ever lost.
        view = memoryview(data)
        while view:
            written = self.output.write(view)
            view = view[len(view) if written is None else written:]

    def _submit(self, chunk):
        dictionary, self._dictionary = self._dictionary, bytes(chunk[-DICTIONARY_SIZE:])
        if self._executor is None:
            self._put(_deflate_chunk(self.level, chunk, dictionary))
            return
        self._pending.append(self._executor.submit(_deflate_chunk, self.level, chunk, dictionary))
        while len(self._pending) > self._max_pending:
            self._put(self._pending.popleft().result())

    def write_chunk(self, chunk):
        """Take over a full CHUNK_SIZE ``chunk`` (bytes or a bytearray the caller never
        touches again) without copying; falls back to ``write`` when not aligned."""
        if self._buffer or len(chunk) != CHUNK_SIZE:
            return self.write(chunk)
        self.crc = zlib.crc32(chunk, self.crc)
        self.size += CHUNK_SIZE
        self._submit(chunk)
        return CHUNK_SIZE

    def write(self, data):
        view = memoryview(data).cast("B")
        self.crc = zlib.crc32(view, self.crc)
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
        """Compress what is left, wait for every chunk, write the final block and trailer."""
        try:
            if self._buffer:
                self._submit(bytes(self._buffer))
                self._buffer.clear()
            while self._pending:
                self._put(self._pending.popleft().result())
            self._put(EMPTY_FINAL_BLOCK + struct.pack("<II", self.crc, self.size & 0xFFFFFFFF))
        finally:
            self.abort()

    def abort(self):
        """Drop pending work without finishing the stream."""
        for future in self._pending:
            future.cancel()
        self._pending.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


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


def iter_gunzip(read):
    """Yield the decompressed bytes of a gzip stream read with ``read(size)``.

    Raises ArchiveError for an empty input, data that is not gzip, a CRC-32 or
    length mismatch in any member, truncation, or trailing bytes that are
    neither another gzip member nor zero padding.
    """
    data = read(READ_SIZE)
    if not data:
        raise ArchiveError("the archive is empty", "empty")
    while len(data) < 2:
        more = read(READ_SIZE)
        if not more:
            break
        data += more
    if data[:2] != GZIP_MAGIC:
        raise ArchiveError("not a gzip file", "not-gzip")
    decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
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
            rest = decompressor.unused_data
            while len(rest) < 2:
                more = read(READ_SIZE)
                if not more:
                    break
                rest += more
            if not rest:
                return
            if rest[:2] == GZIP_MAGIC:  # concatenated member, as gzip(1) allows
                decompressor = zlib.decompressobj(16 + zlib.MAX_WBITS)
                data = rest
                continue
            while rest:
                if rest.count(0) != len(rest):
                    raise ArchiveError("trailing garbage after the gzip data", "trailing-data")
                rest = read(READ_SIZE)
            return
        data = read(READ_SIZE)
        if not data:
            raise ArchiveError("the archive is truncated (the gzip stream ends early)", "truncated")


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
