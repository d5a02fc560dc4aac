"""The blocked gzip writers (one member per block, its length in FEXTRA) and the strict
reader, which inflates such members on every core."""

import gzip
import io
import os
import random
import shutil
import struct
import subprocess
import tarfile
import zlib

import pytest

from ai_stack_backup import gzipstream
from ai_stack_backup.errors import ArchiveError
from ai_stack_backup.gzipstream import CHUNK_SIZE, ParallelGzipWriter, iter_gunzip


def text_like(size, seed=7):
    """Compressible data that is not trivially repetitive, like logs and JSON."""
    generator = random.Random(seed)
    letters = b"abcdefghijklmnop{}:\", "
    words = [bytes(generator.choice(letters) for _ in range(generator.randint(2, 9)))
             for _ in range(3000)]
    out = bytearray()
    while len(out) < size:
        out += b" ".join(generator.choice(words) for _ in range(1000)) + b"\n"
    return bytes(out[:size])


def compress(data, threads=2, level=6, piece=None):
    output = io.BytesIO()
    with ParallelGzipWriter(output, level, threads) as writer:
        piece = piece or max(1, len(data))
        for start in range(0, len(data), piece):
            writer.write(data[start:start + piece])
    return output.getvalue()


def gunzip_all(data):
    return b"".join(iter_gunzip(io.BytesIO(data).read))


SIZES = [0, 1, 100, CHUNK_SIZE - 1, CHUNK_SIZE, CHUNK_SIZE + 1, 3 * CHUNK_SIZE + 12345]


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("threads", [1, 2, 4])
def test_exact_round_trip(size, threads):
    data = text_like(size) if size > 1000 else os.urandom(size)
    compressed = compress(data, threads, piece=65537)
    assert gzip.decompress(compressed) == data
    assert gunzip_all(compressed) == data
    members = list(walk_members(compressed))
    assert len(members) == max(1, -(-size // CHUNK_SIZE))
    for start, member in members:  # each member is gzip on its own, with its own CRC
        content = gzip.decompress(member)
        assert content == data[start:start + len(content)]
        assert struct.unpack("<II", member[-8:]) == (zlib.crc32(content), len(content))


def walk_members(compressed):
    """Yield (content offset, member bytes) by the length field alone, never inflating."""
    offset = start = 0
    while offset < len(compressed):
        length = gzipstream.member_length(compressed[offset:offset + gzipstream.HEADER_SIZE])
        assert length is not None, "member at %d has no length field" % offset
        member = compressed[offset:offset + length]
        yield start, member
        start += struct.unpack("<I", member[-4:])[0]
        offset += length
    assert offset == len(compressed)


@pytest.mark.parametrize("tool", [["gzip", "-dc"], ["busybox", "gunzip", "-c"]])
def test_other_tools_read_it(tool):
    executable = shutil.which(tool[0]) or ("/bin/busybox" if tool[0] == "busybox" else None)
    if executable is None or not os.path.exists(executable):
        pytest.skip("%s is not installed" % tool[0])
    data = text_like(2 * CHUNK_SIZE + 999) + os.urandom(CHUNK_SIZE)
    result = subprocess.run([executable] + tool[1:], input=compress(data), capture_output=True)
    assert result.returncode == 0 and result.stderr == b""
    assert result.stdout == data


def test_tarfile_reads_a_tar_written_through_it(tmp_path):
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for index in range(50):
            payload = text_like(40000 + index, seed=index)
            info = tarfile.TarInfo("folder/file-%d" % index)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    path = tmp_path / "t.tar.gz"
    path.write_bytes(compress(tar_bytes.getvalue(), threads=3, piece=7777))
    with tarfile.open(str(path), "r:gz") as archive:
        names = archive.getnames()
        assert archive.extractfile("folder/file-49").read() == text_like(40049, seed=49)
    assert len(names) == 50


def test_ratio_stays_within_two_percent_of_one_stream():
    data = text_like(6 * CHUNK_SIZE)
    single = len(gzip.compress(data, 6))
    assert len(compress(data, threads=4)) <= single * 1.02


def test_more_than_four_gib_wraps_the_length_field():
    """A multi-GB stream: ISIZE is the length modulo 2**32, CRC over everything."""
    total = 4 * 1024 ** 3 + 12345
    block = bytes(range(256)) * 4096  # 1 MiB
    output = io.BytesIO()
    crc = 0
    with ParallelGzipWriter(output, 1, 2) as writer:
        written = 0
        while written < total:
            piece = block[:min(len(block), total - written)]
            writer.write(piece)
            crc = zlib.crc32(piece, crc)
            written += len(piece)
    compressed = output.getvalue()
    count, check = 0, 0
    for piece in iter_gunzip(io.BytesIO(compressed).read):
        count += len(piece)
        check = zlib.crc32(piece, check)
    assert (count, check) == (total, crc)


def test_in_flight_chunks_are_bounded(monkeypatch):
    pending_seen = []
    original_submit = ParallelGzipWriter._submit

    def watched_submit(self, chunk):
        original_submit(self, chunk)
        pending_seen.append(len(self._work._pending))
    monkeypatch.setattr(ParallelGzipWriter, "_submit", watched_submit)
    compress(text_like(20 * CHUNK_SIZE), threads=2)
    assert pending_seen and max(pending_seen) <= 4


def test_a_failing_worker_is_an_error_never_a_short_archive(monkeypatch):
    calls = []
    original = gzipstream.compress_member

    def failing(level, chunk):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("simulated worker failure")
        return original(level, chunk)
    monkeypatch.setattr(gzipstream, "compress_member", failing)
    output = io.BytesIO()
    with pytest.raises(MemoryError):
        with ParallelGzipWriter(output, 6, 2) as writer:
            for _ in range(8):
                writer.write(text_like(CHUNK_SIZE))
    with pytest.raises(ArchiveError, match="truncated"):
        gunzip_all(output.getvalue())


# --- the strict reader --------------------------------------------------------

def test_reader_refuses_empty_and_non_gzip():
    with pytest.raises(ArchiveError, match="empty"):
        gunzip_all(b"")
    with pytest.raises(ArchiveError, match="not a gzip file"):
        gunzip_all(b"PK\x03\x04 this is a zip")
    with pytest.raises(ArchiveError, match="not a gzip file"):
        gunzip_all(b"\x1f")


def test_reader_checks_crc_and_length():
    good = bytearray(gzip.compress(b"hello world" * 1000))
    bad_crc = bytearray(good)
    bad_crc[-8] ^= 1
    with pytest.raises(ArchiveError, match="CRC"):
        gunzip_all(bytes(bad_crc))
    bad_length = bytearray(good)
    bad_length[-1] ^= 1
    with pytest.raises(ArchiveError, match="length"):
        gunzip_all(bytes(bad_length))


@pytest.mark.parametrize("cut", [10, 100, -9, -4, -1])
def test_reader_refuses_truncation(cut):
    data = compress(text_like(300000))
    with pytest.raises(ArchiveError, match="truncated"):
        gunzip_all(data[:cut])


def test_reader_trailing_data():
    data = gzip.compress(b"payload")
    assert gunzip_all(data + bytes(5000)) == b"payload"  # zero padding, as tapes add
    assert gunzip_all(data + gzip.compress(b" and more")) == b"payload and more"
    with pytest.raises(ArchiveError, match="trailing garbage"):
        gunzip_all(data + b"\0\0garbage")
    with pytest.raises(ArchiveError, match="trailing garbage"):
        gunzip_all(data + bytes(3) + gzip.compress(b"hidden"))


def test_reader_output_is_bounded_for_a_bomb():
    bomb = gzip.compress(bytes(200 * 1024 * 1024), 9)  # 200 MiB of zeros in ~200 KiB
    largest = 0
    total = 0
    for piece in iter_gunzip(io.BytesIO(bomb).read):
        largest = max(largest, len(piece))
        total += len(piece)
    assert total == 200 * 1024 * 1024 and largest <= gzipstream.OUTPUT_LIMIT


def test_short_writes_lose_nothing():
    class Stingy:
        """A raw file that takes at most 1000 bytes per write, as one near a full disk may."""

        def __init__(self):
            self.data = bytearray()

        def write(self, data):
            piece = bytes(data[:1000])
            self.data += piece
            return len(piece)
    output = Stingy()
    payload = os.urandom(300000) + b"text " * 100000
    writer = ParallelGzipWriter(output, 6, 2)
    writer.write(payload)
    writer.close()
    assert gzip.decompress(bytes(output.data)) == payload


# --- blocked members -----------------------------------------------------------

class Collected:
    """An output that keeps what is written and copied, and which copies were asked for."""

    def __init__(self):
        self.data = bytearray()
        self.copies = []

    def write(self, data):
        self.data += data
        return len(data)

    def copy(self, source, offset, data):
        self.copies.append((source, offset, len(data)))
        self.data += data


def blocked_stream(blocks):
    """Write ``blocks`` (bytes each) through a MemberWriter; give (stream, placements)."""
    output = Collected()
    placements = []
    writer = gzipstream.MemberWriter(output, 6, 3)
    for block in blocks:
        writer.compress(block, lambda *place: placements.append(place))
    writer.close()
    return bytes(output.data), placements


def test_large_members_sit_on_block_boundaries_and_small_ones_pack_tight():
    blocks = [b"tiny", os.urandom(300000), b"small" * 10, text_like(900000), os.urandom(70000)]
    stream, placements = blocked_stream(blocks)
    assert len(placements) == len(blocks)
    for (offset, length, crc, size, bytes_crc, digest, copied), block in zip(placements, blocks):
        assert digest is None and not copied
        member = stream[offset:offset + length]
        assert gzip.decompress(member) == block
        assert (crc, size, bytes_crc) == (zlib.crc32(block), len(block), zlib.crc32(member))
        assert gzipstream.member_length(member[:gzipstream.HEADER_SIZE]) == length
        if length >= gzipstream.ALIGN_FROM:
            assert offset % 4096 == 0 and length % 4096 == 0, (offset, length)
        else:
            assert length < 200
    assert placements[1][0] == 4096  # a filler member moved it past the tiny one
    assert gunzip_all(stream) == b"".join(blocks)


@pytest.mark.parametrize("reader", [
    ["gzip", "-t"], ["gzip", "-dc"], ["busybox", "gunzip", "-c"], ["tar", "-tzf", "-"],
    ["busybox", "tar", "-tzf", "-"]])
def test_every_reader_reads_padded_members_and_fillers(reader):
    """FEXTRA padding and empty filler members are plain gzip to gzip, busybox and tar."""
    tar_bytes = io.BytesIO()
    with tarfile.open(fileobj=tar_bytes, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for index in range(6):
            payload = os.urandom(150000) if index % 2 else text_like(5000 + index)
            info = tarfile.TarInfo("folder/file-%d" % index)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    raw = tar_bytes.getvalue()
    blocks = [raw[start:start + 100000] for start in range(0, len(raw), 100000)]
    stream, _ = blocked_stream(blocks)
    assert stream.count(b"\x1f\x8b\x08\x04") >= len(blocks)
    result = subprocess.run(reader, input=stream, capture_output=True)
    assert result.returncode == 0, result.stderr
    if reader[-1] == "-c" or reader[-1] == "-dc":
        assert result.stdout == raw
    elif "tar" in reader[0] or "tar" in reader:
        assert result.stdout.decode().split() == ["folder/file-%d" % i for i in range(6)]
    with tarfile.open(fileobj=io.BytesIO(stream), mode="r:gz") as archive:
        assert archive.getnames() == ["folder/file-%d" % i for i in range(6)]


def test_reader_refuses_a_member_whose_length_field_lies():
    stream, placements = blocked_stream([text_like(200000), text_like(50000, seed=3)])
    offset = placements[0][0]
    lying = bytearray(stream)
    length = struct.unpack("<Q", lying[offset + 16:offset + 24])[0]
    lying[offset + 16:offset + 24] = struct.pack("<Q", length - 4096)
    with pytest.raises(ArchiveError) as refused:
        gunzip_all(bytes(lying))
    assert refused.value.rule in ("gzip-corrupt", "gzip-crc", "gzip-length", "truncated")


def test_reader_refuses_a_member_whose_length_field_takes_in_the_next_one():
    """gzip(1) reads both members; a reader that took the second as the end of the first
    would see less than every other reader."""
    stream, placements = blocked_stream([b"first member " * 20, b"second member " * 20])
    (offset, length), second = placements[0][:2], placements[1][1]
    assert offset == 0 and placements[1][0] == length and len(stream) == length + second
    lying = bytearray(stream)
    lying[16:24] = struct.pack("<Q", length + second)
    assert gzip.decompress(bytes(lying)) == b"first member " * 20 + b"second member " * 20
    with pytest.raises(ArchiveError) as refused:
        gunzip_all(bytes(lying))
    assert refused.value.rule == "gzip-corrupt"


@pytest.mark.parametrize("where", ["deflate", "crc", "length"])
def test_parallel_reader_checks_every_member(where):
    stream, placements = blocked_stream([text_like(300000), text_like(300000, seed=5)])
    offset, length = placements[1][:2]
    damaged = bytearray(stream)
    position = {"deflate": offset + length // 2, "crc": offset + length - 8,
                "length": offset + length - 1}[where]
    damaged[position] ^= 0x40
    with pytest.raises(ArchiveError) as refused:
        gunzip_all(bytes(damaged))
    assert refused.value.rule in ("gzip-crc", "gzip-length", "gzip-corrupt")


def test_parallel_reader_refuses_truncation_at_a_member_boundary_of_an_aborted_stream():
    output = io.BytesIO()
    writer = ParallelGzipWriter(output, 6, 2)
    writer.write(text_like(3 * CHUNK_SIZE))
    writer.abort()
    with pytest.raises(ArchiveError) as refused:
        gunzip_all(output.getvalue())
    assert refused.value.rule == "truncated"


def test_parallel_reader_streams_a_member_too_large_to_hold():
    """A member with our length field whose content is huge (a bomb) is read bounded."""
    content = bytes(gzipstream.MEMBER_OUTPUT_LIMIT + 5 * gzipstream.OUTPUT_LIMIT)
    member = gzipstream.compress_member(9, content)
    largest = total = 0
    for piece in iter_gunzip(io.BytesIO(member + member).read):
        largest = max(largest, len(piece))
        total += len(piece)
    assert total == 2 * len(content) and largest <= gzipstream.MEMBER_OUTPUT_LIMIT


def test_parallel_reader_keeps_order_and_mixes_with_foreign_members():
    stream, _ = blocked_stream([text_like(120000, seed=i) for i in range(9)])
    foreign = gzip.compress(b"from another gzip")
    data = gunzip_all(stream + foreign + stream)
    expected = b"".join(text_like(120000, seed=i) for i in range(9))
    assert data == expected + b"from another gzip" + expected
    with pytest.raises(ArchiveError, match="trailing garbage"):
        gunzip_all(stream + b"junk")
