"""A first backup tarred while the helper lists the volume: its record is the one a
backup planned from the whole listing makes, and whatever the two walks disagree on is
read again next time (no engine: a tar stream and a listing made here)."""

import gzip
import hashlib
import io
import os
import tarfile
import zlib

import pytest

from ai_stack_backup import blocked
from ai_stack_backup.exclusions import NONE, Exclusions
from ai_stack_backup.gzipstream import MemberWriter, compress_member
from ai_stack_backup.tarstream import ArchiveRules

STARTED = 1000


class Progress:
    def advance(self, count):
        pass


def volume_tar(files):
    """A busybox-like tar of ``files`` (name -> bytes; None: a folder), names ``./…``."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.mtime = 999
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def listing_line(number, name, data, ctime=STARTED - 1, links=1):
    mode = "41ed" if data is None else "81a4"
    return b"%d %d %d %d %s 0 0 999 %s" % (ctime, number, links, len(data or b""),
                                         mode.encode(), name.rstrip("/").encode())


FILES = {"./": None, "./a/": None}
FILES.update(("./a/f%03d" % index, b"%03d" % index * 1000) for index in range(40))
FILES["./big"] = b"B" * (blocked.LARGE_FILE + 5)
FILES.update(("./z%02d" % index, b"z" * 700) for index in range(10))


def lines_of(files, **special):
    """Listing lines for ``files``; ``special`` maps a name to listing_line's keywords
    (None: no line)."""
    lines = []
    for number, (name, data) in enumerate(files.items()):
        keywords = special.get(name, {})
        if keywords is not None:
            lines.append(listing_line(number + 10, "." if name == "./" else name, data,
                                      **keywords))
    return lines


def in_pieces(data, size):
    pieces = [data[start:start + size] for start in range(0, len(data), size)]
    return iter(pieces + [b""]).__next__


def while_listed(tar, lines, piece=7):
    output = io.BytesIO()
    listed = blocked.GrowingListing(in_pieces(b"".join(line + b"\n" for line in lines), piece))
    made = blocked.assemble_while_listing(listed, iter([tar]), MemberWriter(output), STARTED,
                                          ArchiveRules().check, Progress())
    return made, output.getvalue()


class Output(io.BytesIO):
    """An archive in memory; members copied from a previous archive are written out."""

    def copy(self, source, offset, data):
        self.write(data)


def planned(tar, lines, tmp_path, previous=None):
    """Assemble the archive planned from ``lines`` (and ``previous``), ``tar`` holding the
    entries it does not copy."""
    path = tmp_path / "listing"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    listing = blocked.Listing(str(path), STARTED, None, False)
    output = Output()
    items = lambda: blocked.plan(blocked.entries(listing, NONE, set()), previous,  # noqa: E731
                                 {})
    made = blocked.assemble(items(), iter([tar]), MemberWriter(output), previous, {}, STARTED,
                            ArchiveRules().check, Progress())
    return made, output.getvalue()


@pytest.fixture
def small_runs(monkeypatch):
    monkeypatch.setattr(blocked, "RUN_SIZE", 8192)  # several runs from a small tar


def keys(made, kind):
    return [block[6] for block in made.blocks if block[0] == kind]


def keyed_by_their_own_lines(made, files, lines):
    """Whether every run and head keyed by a listing digest is keyed by the lines of exactly
    the members it holds."""
    paths = [name.strip("./") if name != "./" else "" for name in files]
    line_of = {blocked.Entry(line).path: line for line in lines}
    for block in made.blocks:
        kind, key = block[0], block[6]
        if kind == "run" and key[2] is not None:
            start = paths.index(bytes.fromhex(key[0]).decode())
            held = paths[start:start + key[1]]
            digest = hashlib.sha256(b"".join(line_of[path.encode()] + b"\n" for path in held))
            if digest.hexdigest() != key[2]:
                return False
        elif kind == "head" and key[1] is not None:
            line = line_of[bytes.fromhex(key[0])]
            if hashlib.sha256(line).hexdigest() != key[1]:
                return False
    return True


def test_a_volume_tarred_while_listed_gets_the_record_a_planned_backup_gives(
        small_runs, tmp_path):
    tar = volume_tar(FILES)
    # A racy entry and a hard-linked one get members of their own, as planned backups do.
    lines = lines_of(FILES, **{"./a/f007": {"ctime": STARTED}, "./z03": {"links": 2}})
    made, archive = while_listed(tar, lines)
    expected, expected_archive = planned(tar, lines, tmp_path)
    assert made.blocks == expected.blocks and archive == expected_archive
    assert made.members == len(FILES) and keyed_by_their_own_lines(made, FILES, lines)
    runs = keys(made, "run")
    assert len(runs) > 4 and sum(key[2] is None for key in runs) == 2
    assert keys(made, "head")[0][1] is not None
    assert gzip.decompress(archive) == tar


def test_entries_written_just_before_the_listing_share_runs_of_their_own(small_runs,
                                                                        tmp_path):
    """Racy entries in a row (say, files written in the second the listing began) share one
    run, not a member apiece; the entries around them stay keyed by their lines."""
    tar = volume_tar(FILES)
    racy = ["./a/f%03d" % index for index in range(10, 16)]
    lines = lines_of(FILES, **{name: {"ctime": STARTED} for name in racy})
    for made, archive in (while_listed(tar, lines), planned(tar, lines, tmp_path)):
        assert gzip.decompress(archive) == tar and made.members == len(FILES)
        runs = keys(made, "run")
        unkeyed = [key for key in runs if key[2] is None]
        # Six of 3.5 KiB of tar each: two runs, as a run closes at RUN_SIZE (8 KiB here).
        assert [(bytes.fromhex(key[0]), key[1]) for key in unkeyed] == [(b"a/f010", 3),
                                                                       (b"a/f013", 3)]
        assert keyed_by_their_own_lines(made, FILES, lines)
        before, after = runs.index(unkeyed[0]) - 1, runs.index(unkeyed[-1]) + 1
        assert runs[before][2] is not None and runs[after][2] is not None
        assert bytes.fromhex(runs[after][0]) == b"a/f016"


def test_members_the_walks_disagree_on_are_read_again_and_the_archive_is_the_tar(
        small_runs):
    tar = volume_tar(FILES)
    lines = lines_of(FILES, **{"./a/f020": None})  # made after the listing passed it
    lines.insert(5, listing_line(99, "./a/gone", b"x"))  # deleted before tar came to it
    made, archive = while_listed(tar + bytes(3 * 512), lines, piece=100)  # tar's own end
    assert gzip.decompress(archive) == tar + bytes(3 * 512)
    with tarfile.open(fileobj=io.BytesIO(archive)) as opened:
        assert opened.getnames() == [name.rstrip("/") if name != "./" else "."
                                     for name in FILES]
    assert keyed_by_their_own_lines(made, FILES, lines)
    runs = keys(made, "run")
    unlisted = [key for key in runs if key[2] is None]
    assert len(unlisted) == 1 and unlisted[0][0] == b"a/f020".hex()
    # The lines around a line tar never met still key their runs.
    assert sum(key[2] is not None for key in runs) == len(runs) - 1


def test_a_listing_that_turns_out_unusable_keys_nothing(small_runs):
    made, _ = while_listed(volume_tar(FILES), lines_of(FILES))
    assert any(key[2] for key in keys(made, "run"))
    blocked.forget_listing(made.blocks)
    assert all(key[2] is None for key in keys(made, "run"))
    assert all(key[1] is None for key in keys(made, "head"))
    assert all(key[2] for key in keys(made, "piece"))  # a piece is keyed by its bytes


@pytest.mark.parametrize("content, reused", [
    (bytes(10240), True),  # an end padded to a tar record
    (bytes(1024), True),  # busybox's own end
    (bytes(512), False),  # not an end-of-archive marker
    (bytes(1023) + b"x", False),  # not zeros
])
def test_only_an_end_of_zeros_is_copied_from_the_previous_archive(tmp_path, content, reused):
    member = compress_member(6, content)
    path = tmp_path / "previous.tar.gz"
    path.write_bytes(member)
    end = blocked.Block("end", 0, len(member), zlib.crc32(content), len(content),
                        zlib.crc32(member), [])
    previous = blocked.Previous(str(path), os.open(str(path), os.O_RDONLY), [end])
    try:
        assert (previous.end_member() == member) if reused else previous.end_member() is None
    finally:
        previous.close()


def test_runs_after_a_removed_entry_are_cut_as_before_and_copied_by_their_content(
        small_runs, tmp_path):
    """Every line new (a restored volume: new inodes and ctimes) and one file fewer: nothing
    is planned from the listing, yet only the run that held the removed file is compressed
    again; the runs after it close where the previous archive's did and are copied."""
    first, archive = planned(volume_tar(FILES), lines_of(FILES), tmp_path)
    path = tmp_path / "previous.tar.gz"
    path.write_bytes(archive)
    previous = blocked.Previous(str(path), os.open(str(path), os.O_RDONLY),
                                [blocked.Block(*saved) for saved in first.blocks])
    files = {name: data for name, data in FILES.items() if name != "./a/f020"}
    tar = volume_tar(files)
    try:
        made, archive = planned(tar, lines_of(files, **{name: {"ctime": STARTED - 2}
                                                         for name in files}), tmp_path, previous)
    finally:
        previous.close()
    # The end is the previous archive's (zeros to its tar record), the members the tar's.
    content = gzip.decompress(archive)
    assert content.rstrip(b"\0") == tar.rstrip(b"\0") and made.members == len(files)
    with tarfile.open(fileobj=io.BytesIO(archive)) as opened:
        assert [member.name for member in opened] == [
            name.rstrip("/") if name != "./" else "." for name in files]
    old_runs = {(key[0], key[1]): key[3] for key in keys(first, "run")}
    runs = keys(made, "run")
    changed = [key for key in runs if old_runs.get((key[0], key[1])) != key[3]]
    # f021 and f022: the run that held f020, one file short. Every other run, the big
    # file's pieces and the end are the previous archive's bytes (its head is written:
    # a head is copied by its line only).
    assert [(bytes.fromhex(key[0]), key[1]) for key in changed] == [(b"a/f021", 2)]
    assert made.written == 2 * (512 + 3072) + 512
    assert made.reused == len(content) - made.written


@pytest.mark.parametrize("over, makes", [(0, 1), (1, 2)])
def test_a_plan_naming_few_entries_is_made_once_and_a_larger_one_again(
        small_runs, tmp_path, monkeypatch, over, makes):
    """A night's plan, mostly copies, is walked once for the helper's names and kept for the
    assembly; a plan naming more than HELD_ENTRIES entries (copies not counted) is made
    again from the listing instead of held. Either way the assembly gets the same items."""
    first, archive = planned(volume_tar(FILES), lines_of(FILES), tmp_path)
    path = tmp_path / "previous.tar.gz"
    path.write_bytes(archive)
    previous = blocked.Previous(str(path), os.open(str(path), os.O_RDONLY),
                                [blocked.Block(*saved) for saved in first.blocks])
    changed = lines_of(FILES, **{"./a/f020": {"ctime": STARTED - 3}})
    listing_path = tmp_path / "night-2"
    listing_path.write_bytes(b"".join(line + b"\n" for line in changed))
    listing = blocked.Listing(str(listing_path), STARTED, None, False)
    made = []

    def make():
        made.append(1)
        return blocked.plan(blocked.entries(listing, NONE, set()), previous, {})
    try:
        expected = list(make())
        fresh = [value.name for kind, value in expected if kind == blocked.FRESH]
        # The run that held f020 is read again, and only that run.
        assert b"./a/f020" in fresh and len(fresh) < 5
        monkeypatch.setattr(blocked, "HELD_ENTRIES", len(fresh) - over)
        plan = blocked.HeldPlan(previous)
        assert list(plan.names_to_tar(make())) == fresh
        items = list(plan.items(make))
    finally:
        previous.close()
    assert len(made) == 1 + makes

    def shown(items):
        return [(kind, [block.offset for block in value] if kind == blocked.REUSE
                 else value.line) for kind, value in items]
    assert shown(items) == shown(expected)
    assert [kind for kind, _ in items].count(blocked.REUSE) >= 3  # copied runs, held or not


def test_a_plan_never_walked_for_names_is_made_for_the_assembly():
    """Where the helper is told every name (nothing to copy), the plan is made once, then."""
    plan = blocked.HeldPlan(None)
    assert list(plan.items(lambda: iter([(blocked.FRESH, "entry")]))) == [(blocked.FRESH,
                                                                            "entry")]


@pytest.mark.parametrize("piece", [1, 7, 4096])
def test_a_listing_read_as_it_is_written_gives_the_entries_of_the_whole_file(tmp_path, piece):
    """Lines cut anywhere between reads give the same entries as the complete listing, with
    the same exclusions and left-out paths."""
    lines = lines_of(FILES)
    text = b"".join(line + b"\n" for line in lines)
    path = tmp_path / "listing"
    path.write_bytes(text)
    listing = blocked.Listing(str(path), STARTED, None, False)
    left_out = {b"z03"}
    exclusions = Exclusions(["a/f01*"])

    def shown(entries):
        return [entry.line for entry in entries]
    whole = shown(blocked.entries(listing, exclusions, left_out))
    assert shown(blocked.entries_as_written(in_pieces(text, piece), exclusions,
                                            left_out)) == whole
    assert len(whole) == len(lines) - 10 - 1  # a/f010…a/f019 excluded, z03 left out


def test_a_listing_read_as_it_is_written_stops_at_a_line_of_a_name_with_a_line_break():
    text = b"".join(line + b"\n" for line in lines_of(FILES)[:5]) + b"?\n"
    with pytest.raises(ValueError):
        list(blocked.entries_as_written(in_pieces(text, 3), NONE, set()))
