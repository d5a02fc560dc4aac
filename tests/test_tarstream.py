"""The tar parser, the safety rules and the header writer, on archives built in memory."""

import io
import sys
import tarfile

import pytest

from ai_stack_backup.errors import ArchiveError
from ai_stack_backup.tarstream import DIRECTORY, END_OF_ARCHIVE, FIFO, FILE, HARDLINK, SYMLINK, \
    ArchiveRules, Member, TarReader, _PathTable, encode_header, member_header, normalize


def entry(name, kind=tarfile.REGTYPE, data=b"", linkname="", mode=0o644, uid=0, gid=0,
          mtime=1_600_000_000, pax=None):
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    info.uid, info.gid, info.mtime, info.size = uid, gid, mtime, len(data)
    if pax:
        info.pax_headers = pax
    return info, data


def raw_tar(entries, fmt=tarfile.GNU_FORMAT, end=END_OF_ARCHIVE):
    """A tar stream of ``entries``; tarfile checks nothing, so hostile names are possible."""
    out = io.BytesIO()
    for info, data in entries:
        out.write(info.tobuf(fmt, "utf-8", "surrogateescape"))
        out.write(data + bytes(-len(data) % 512))
    out.write(end)
    return out.getvalue()


def read_all(data, chunk=None, rules=False):
    """Parse ``data`` fed in chunks; give [(member, content)]."""
    chunks = [data[i:i + chunk] for i in range(0, len(data), chunk)] if chunk else [data]
    reader = TarReader(chunks)
    checker = ArchiveRules() if rules else None
    result = []
    for member in reader:
        if checker:
            checker.check(member)
        result.append((member, b"".join(bytes(piece) for piece in reader.data())))
    return result


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("chunk", [None, 1, 511, 4096])
def test_parses_what_tarfile_writes(fmt, chunk):
    long_folder = "f" * 120 if fmt != tarfile.USTAR_FORMAT else "f" * 90
    entries = [entry("./", tarfile.DIRTYPE, mode=0o755),
               entry("./%s/" % long_folder, tarfile.DIRTYPE, mode=0o700),
               entry("./%s/data.bin" % long_folder, data=bytes(range(256)) * 7, mode=0o4755,
                     uid=1234, gid=5678),
               entry("./link", tarfile.SYMTYPE, linkname="/absolute/target"),
               entry("./short", data=b"s"),
               entry("./hard", tarfile.LNKTYPE, linkname="./short"),
               entry("./fifo", tarfile.FIFOTYPE, mode=0o620),
               entry("./empty")]
    if fmt != tarfile.USTAR_FORMAT:
        entries.append(entry("./ünïcode-\udcff-name", data=b"x", uid=3_000_000))
    members = read_all(raw_tar(entries, fmt), chunk, rules=True)
    assert [m.path for m, _ in members][:3] == [b"", long_folder.encode(),
                                                 long_folder.encode() + b"/data.bin"]
    file_member, content = members[2]
    assert (file_member.kind, file_member.mode, file_member.uid, file_member.gid,
            file_member.mtime) == (FILE, 0o4755, 1234, 5678, 1_600_000_000)
    assert content == bytes(range(256)) * 7
    assert members[3][0].kind == SYMLINK and members[3][0].linkname == b"/absolute/target"
    assert members[5][0].kind == HARDLINK and members[5][0].link_path == b"short"
    if fmt != tarfile.USTAR_FORMAT:
        last = members[-1][0]
        assert last.path == "ünïcode-".encode() + b"\xff-name" and last.uid == 3_000_000


def test_pax_records_override_the_header():
    info, data = entry("short", data=b"abc", pax={"path": "a/much/longer/pax/name",
                                                  "mtime": "1700000000.75", "uid": "42",
                                                  "linkpath": "", "comment": "ignored"})
    member, content = read_all(raw_tar([(info, data)], tarfile.PAX_FORMAT))[0]
    assert (member.name, member.mtime, member.uid, content) == \
        (b"a/much/longer/pax/name", 1_700_000_000, 42, b"abc")


def test_end_of_archive_rules():
    body = raw_tar([entry("./a", data=b"1")], end=b"")
    assert len(read_all(body + END_OF_ARCHIVE + bytes(10240))) == 1  # record padding is fine
    with pytest.raises(ArchiveError, match="no end-of-archive marker"):
        read_all(body)
    with pytest.raises(ArchiveError, match="inside its end-of-archive marker"):
        read_all(body + bytes(512))
    with pytest.raises(ArchiveError, match="lone zero block"):
        read_all(body + bytes(512) + raw_tar([entry("./hidden", data=b"2")]))
    with pytest.raises(ArchiveError, match="data follows the end-of-archive marker"):
        read_all(body + END_OF_ARCHIVE + b"\0" * 100 + b"junk")
    with pytest.raises(ArchiveError, match="truncated inside a member's data"):
        read_all(body[:512 + 100])
    with pytest.raises(ArchiveError, match="truncated inside a tar header"):
        read_all(body + b"x" * 100)


def test_not_tar_and_corrupt_headers():
    with pytest.raises(ArchiveError, match="not a tar archive"):
        read_all(b"hello, this is not tar" * 100)
    data = bytearray(raw_tar([entry("./a", data=b"1"), entry("./b", data=b"2")]))
    data[1024 + 10] ^= 1
    with pytest.raises(ArchiveError, match="checksum mismatch"):
        read_all(bytes(data))


def _with_checksum(header, checksum):
    return header[:148] + b"%06o\0 " % checksum + header[156:]


@pytest.mark.parametrize("fill", [0x01, 0x7F, 0xFF])
def test_header_checksums_are_exact_at_any_byte_sum(fill):
    """The checksum is the exact sum of the header's bytes, also where it passes 65521 (the
    Adler-32 modulus the reader sums with) and in the signed form old tars wrote."""
    info, data = entry(bytes([fill]).decode("latin-1") * 100, data=b"x")
    info.uname = info.gname = bytes([fill]).decode("latin-1") * 31
    header = bytearray(info.tobuf(tarfile.GNU_FORMAT, "latin-1", "strict"))
    header[345:500] = bytes([fill]) * 155  # the padding too: the largest sums a header has
    unsigned = sum(header[:148]) + 256 + sum(header[156:512])
    signed = sum(b - 256 if b > 127 else b for b in header[:148] + header[156:512]) + 256
    body = data + bytes(-len(data) % 512) + END_OF_ARCHIVE
    for checksum in {unsigned, signed}:
        assert [(member.name, content) for member, content in read_all(
            _with_checksum(bytes(header), checksum) + body)] == [(bytes([fill]) * 100, b"x")]
    for wrong in (unsigned + 1, unsigned - 1, unsigned + 65521, unsigned - 65521):
        if wrong != signed and wrong >= 0:
            with pytest.raises(ArchiveError, match="not a tar archive"):
                read_all(_with_checksum(bytes(header), wrong) + body)


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_SPARSE, b"V", b"D", b"M", b"Z"])
def test_unsupported_member_types_are_refused(kind):
    info, data = entry("./odd", kind=kind)
    with pytest.raises(ArchiveError, match="not supported"):
        read_all(raw_tar([(info, data)]))


def test_sparse_pax_and_oversized_extended_headers_are_refused():
    info, data = entry("./s", data=b"x", pax={"GNU.sparse.major": "1"})
    with pytest.raises(ArchiveError, match="sparse"):
        read_all(raw_tar([(info, data)], tarfile.PAX_FORMAT))
    long = tarfile.TarInfo("././@LongLink")
    long.type, long.size = tarfile.GNUTYPE_LONGNAME, 5 * 1024 * 1024
    with pytest.raises(ArchiveError, match="too large"):
        read_all(long.tobuf(tarfile.GNU_FORMAT) + bytes(long.size) + END_OF_ARCHIVE)


def test_non_file_members_must_not_carry_data():
    info = tarfile.TarInfo("./d")
    info.type, info.size = tarfile.DIRTYPE, 512
    raw = info.tobuf(tarfile.GNU_FORMAT)
    raw = raw[:124] + b"%011o\0" % 512 + raw[136:]  # tarfile would write 0; force a size
    checksum = sum(raw[:148]) + 256 + sum(raw[156:512])
    raw = raw[:148] + b"%06o\0 " % checksum + raw[156:]
    with pytest.raises(ArchiveError, match="carries data"):
        read_all(raw + bytes(512) + END_OF_ARCHIVE)


# --- safety rules -------------------------------------------------------------

HOSTILE = {
    "absolute name": [entry("/etc/passwd", data=b"x")],
    "dot-dot": [entry("./a/../../etc/passwd", data=b"x")],
    "empty name": [entry("", data=b"x")],
    "NUL in a pax path": [entry("x", data=b"1", pax={"path": "a\0b"})],
    "character device": [entry("./null", tarfile.CHRTYPE)],
    "block device": [entry("./sda", tarfile.BLKTYPE)],
    "through a symlink": [entry("./escape", tarfile.SYMTYPE, linkname="/etc"),
                          entry("./escape/cron.d/evil", data=b"x")],
    "through a relative symlink": [entry("./up", tarfile.SYMTYPE, linkname=".."),
                                   entry("./up/x", data=b"x")],
    "hard link to an outside file": [entry("./passwd", tarfile.LNKTYPE, linkname="/etc/passwd")],
    "hard link to a later file": [entry("./early", tarfile.LNKTYPE, linkname="./late"),
                                  entry("./late", data=b"x")],
    "through a hard link to a symlink": [entry("./s", tarfile.SYMTYPE, linkname="/etc"),
                                         entry("./l", tarfile.LNKTYPE, linkname="./s"),
                                         entry("./l/cron.d/evil", data=b"x")],
    "hard link to a folder": [entry("./d", tarfile.DIRTYPE),
                              entry("./l", tarfile.LNKTYPE, linkname="./d")],
    "hard link to itself": [entry("./a", data=b"x"), entry("./a", tarfile.LNKTYPE,
                                                            linkname="./a")],
    "folder replaced by a symlink": [entry("./d/f", data=b"x"),
                                     entry("./d", tarfile.SYMTYPE, linkname="/")],
    "file turned into a folder": [entry("./x", data=b"x"), entry("./x/y", data=b"y")],
    "folder turned into a file": [entry("./x", tarfile.DIRTYPE), entry("./x", data=b"x")],
    "root as a symlink": [entry("./", tarfile.SYMTYPE, linkname="/")],
    "file twice": [entry("./x", data=b"1"), entry("./x", data=b"2")],
    "hard link twice": [entry("./x", data=b"1"), entry("./h", tarfile.LNKTYPE, linkname="./x"),
                        entry("./h", tarfile.LNKTYPE, linkname="./x")],
    "file replaced by a hard link": [entry("./x", data=b"1"), entry("./y", data=b"2"),
                                     entry("./y", tarfile.LNKTYPE, linkname="./x")],
    "symlink twice": [entry("./s", tarfile.SYMTYPE, linkname="/a"),
                      entry("./s", tarfile.SYMTYPE, linkname="b")],
    "empty symlink target": [entry("./s", tarfile.SYMTYPE, linkname="")],
}


# The rule that must fire for each case: not just any refusal.
HOSTILE_RULES = {
    "absolute name": "absolute-name", "dot-dot": "dotdot", "empty name": "empty-name",
    "NUL in a pax path": "nul-byte", "character device": "device-file",
    "block device": "device-file", "through a symlink": "through-symlink",
    "through a relative symlink": "through-symlink",
    "through a hard link to a symlink": "through-symlink",
    "hard link to an outside file": "absolute-name", "hard link to a later file": "hardlink-target",
    "hard link to a folder": "hardlink-target",
    "hard link to itself": "hardlink-target", "folder replaced by a symlink": "type-change",
    "file turned into a folder": "through-non-folder", "folder turned into a file": "type-change",
    "root as a symlink": "root-not-folder", "file twice": "repeated-member",
    "hard link twice": "repeated-member", "file replaced by a hard link": "repeated-member",
    "symlink twice": "repeated-member", "empty symlink target": "symlink-target",
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_members_are_refused(case):
    fmt = tarfile.PAX_FORMAT if "pax" in case else tarfile.GNU_FORMAT
    with pytest.raises(ArchiveError) as refused:
        read_all(raw_tar(HOSTILE[case], fmt), rules=True)
    assert refused.value.rule == HOSTILE_RULES[case]


def test_ordinary_volume_contents_pass_the_rules():
    entries = [entry("./", tarfile.DIRTYPE), entry("./abs", tarfile.SYMTYPE, linkname="/etc"),
               entry("./rel", tarfile.SYMTYPE, linkname="../../outside"),
               entry("./a/b/c", data=b"implicit folders"), entry("./a", tarfile.DIRTYPE),
               entry("./a/hard", tarfile.LNKTYPE, linkname="./a/b/c"),
               entry("./a/", tarfile.DIRTYPE, mode=0o700),  # folders may repeat
               entry("a//b/./d", data=b"odd spelling"),
               # Another name for a symlink or a FIFO: what a volume may hold.
               entry("./abs-too", tarfile.LNKTYPE, linkname="./abs"),
               entry("./pipe", tarfile.FIFOTYPE),
               entry("./pipe-too", tarfile.LNKTYPE, linkname="./pipe")]
    members = read_all(raw_tar(entries), rules=True)
    assert [m.path for m, _ in members] == [b"", b"abs", b"rel", b"a/b/c", b"a", b"a/hard",
                                            b"a", b"a/b/d", b"abs-too", b"pipe", b"pipe-too"]


def test_normalize():
    assert normalize(b"./") == b""
    assert normalize(b"./a//b/./c/") == b"a/b/c"
    assert normalize(b"a...b/..c") == b"a...b/..c"
    for bad in (b"", b"/a", b"a/../b", b"..", b"a\0b"):
        with pytest.raises(ArchiveError):
            normalize(bad)


def test_path_table_holds_many_paths():
    table = _PathTable()
    for index in range(20000):
        table.put(b"folder/%d" % index, FILE if index % 2 else DIRECTORY)
    assert all(table.get(b"folder/%d" % index) == (FILE if index % 2 else DIRECTORY)
               for index in range(20000))
    assert table.get(b"folder/20000") is None and table.get(b"other") is None


# --- re-emission ----------------------------------------------------------------

def test_member_header_reemits_exactly(tmp_path):
    odd = b"./new\nline \xff" + b"n" * 150
    member = Member(odd, FILE, mode=0o6755, uid=4_000_000, gid=7, mtime=1_234_567_890, size=3)
    member.path = normalize(odd)
    link = Member(b"./l", SYMLINK, linkname=b"/t" * 80, uid=5, gid=6, mtime=99)
    link.path = b"l"
    folder = Member(b"./d/", DIRECTORY, mode=0o2770)
    folder.path = b"d"
    stream = (member_header(member) + b"abc" + bytes(509) + member_header(link)
              + member_header(folder) + END_OF_ARCHIVE)
    parsed = read_all(stream, rules=True)
    assert [(m.path, m.kind, m.mode, m.uid, m.gid, m.mtime, m.linkname, m.uname)
            for m, _ in parsed] == [
        (member.path, FILE, 0o6755, 4_000_000, 7, 1_234_567_890, b"", b""),
        (b"l", SYMLINK, 0o644, 5, 6, 99, b"/t" * 80, b""),
        (b"d", DIRECTORY, 0o2770, 0, 0, 0, b"", b"")]
    assert parsed[0][1] == b"abc"
    path = tmp_path / "x.tar"
    path.write_bytes(stream)
    with tarfile.open(str(path)) as archive:  # and tarfile agrees
        assert archive.getmembers()[0].name.encode("utf-8", "surrogateescape") == \
            b"./" + member.path


HEADER_CASES = [
    (b"a.txt", FILE, dict(size=14)),
    (b"n" * 98, FILE, dict(size=1)),                  # exactly 100 bytes with "./"
    (b"n" * 99, FILE, dict(size=1)),                  # 101: a GNU long-name record
    (b"d" * 98, DIRECTORY, {}),                       # the slash makes it 101
    (b"bad-\xff\xfe\nname with space", FILE, dict(mode=0o7777)),
    (b"big-owner", FILE, dict(uid=2 ** 21, gid=2 ** 40)),  # base-256
    (b"far-future", FILE, dict(mtime=8 ** 11 + 5)),   # base-256 mtime
    (b"before-1970", FILE, dict(mtime=-86400)),       # negative: base-256 two's complement
    (b"huge", FILE, dict(size=9 * 1024 ** 3)),       # over 8 GiB: base-256 size
    (b"fifo", FIFO, dict(mode=0o620)),
    (b"link", SYMLINK, dict(linkname=b"/t" * 60)),     # a GNU long-link record
    (b"l" * 120, HARDLINK, dict(link_path=b"h" * 110)),
]


def tarfile_header(member):
    kinds = {FILE: tarfile.REGTYPE, DIRECTORY: tarfile.DIRTYPE, SYMLINK: tarfile.SYMTYPE,
             HARDLINK: tarfile.LNKTYPE, FIFO: tarfile.FIFOTYPE}
    info = tarfile.TarInfo((b"./" + member.path).decode("utf-8", "surrogateescape"))
    info.type, info.mode, info.uid, info.gid = kinds[member.kind], member.mode, member.uid, \
        member.gid
    info.mtime, info.size = member.mtime, member.size if member.kind == FILE else 0
    info.uname = info.gname = ""
    if member.kind == HARDLINK:
        info.linkname = (b"./" + member.link_path).decode("utf-8", "surrogateescape")
    elif member.kind == SYMLINK:
        info.linkname = member.linkname.decode("utf-8", "surrogateescape")
    return info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")


OWNED_CASES = [  # owner names and short link targets: the parts of a header made once
    (b"a", FILE, b"", b"root", b"root"),
    (b"b", FILE, b"", b"www-data", b"adm"),
    (b"c", FILE, b"", b"", b"root"),
    (b"c2", FILE, b"", b"root", b"adm"),
    (b"d/", DIRECTORY, b"", b"root", b"root"),
    (b"e", SYMLINK, b"target-one", b"root", b"root"),
    (b"f", SYMLINK, b"target-two", b"root", b"root"),
    (b"g", HARDLINK, b"a", b"www-data", b"adm"),
    (b"h", FIFO, b"", b"n" * 40, b"g" * 40),  # cut to 32 bytes, as tarfile does
]


def test_headers_with_owner_names_are_what_tarfile_writes_each_time():
    kinds = {FILE: tarfile.REGTYPE, DIRECTORY: tarfile.DIRTYPE, SYMLINK: tarfile.SYMTYPE,
             HARDLINK: tarfile.LNKTYPE, FIFO: tarfile.FIFOTYPE}
    # Twice round, in turns: a header made from what an earlier one kept must not differ.
    for _ in range(2):
        for name, kind, linkname, uname, gname in OWNED_CASES:
            size = 7 if kind == FILE else 0
            ours = encode_header(name, kind, 0o640, 33, 4, 1_600_000_000, size, linkname,
                                 uname, gname)
            info = tarfile.TarInfo(name.decode())
            info.type, info.mode, info.uid, info.gid = kinds[kind], 0o640, 33, 4
            info.mtime, info.size, info.linkname = 1_600_000_000, size, linkname.decode()
            info.uname, info.gname = uname.decode(), gname.decode()
            theirs = info.tobuf(tarfile.GNU_FORMAT, "utf-8", "surrogateescape")
            if sys.version_info >= (3, 9):  # 3.8's tarfile writes octal zeros as device numbers
                assert ours == theirs, name
            parsed = tarfile.open(fileobj=io.BytesIO(ours + bytes(512 + 1024)), mode="r:").next()
            assert (parsed.name, parsed.linkname, parsed.uname, parsed.gname, parsed.size) == \
                (info.name.rstrip("/"), info.linkname, info.uname[:32], info.gname[:32], size)


@pytest.mark.parametrize("path, kind, fields", HEADER_CASES)
def test_member_header_is_what_tarfile_writes(path, kind, fields):
    fields = dict(fields)
    link_path = fields.pop("link_path", None)
    member = Member(b"./" + path, kind, **dict(dict(mode=0o644, mtime=1_600_000_000), **fields))
    member.path, member.link_path = path, link_path
    ours, theirs = member_header(member), tarfile_header(member)
    if sys.version_info >= (3, 9):  # 3.8's tarfile writes octal zeros as device numbers
        assert ours == theirs
    parsed = [tarfile.open(fileobj=io.BytesIO(raw + bytes(member.size if kind == FILE and
                                                            member.size < 10 ** 6 else 0)
                                              + bytes(1024)), mode="r:").next()
              if member.size < 10 ** 6 else None for raw in (ours, theirs)]
    if parsed[0] is not None:
        ours_info, theirs_info = (dict(one.get_info(), chksum=None) for one in parsed)
        assert ours_info == theirs_info
