"""Seeded fuzzing: randomly damaged archives are refused untouched or restored exactly.

Several hundred mutations (truncations, flipped bytes in the gzip or the tar,
spliced and duplicated members, trailing garbage) go through restore_path on
the host; a deterministic sample goes through the volume restore on the real
engine. Each one is either refused with the target unchanged, or restored to
exactly what a model built from the archive's own members says: never a
partial result.
"""

import gzip
import hashlib
import io
import os
import random
import tarfile

import pytest

import testkit
from ai_stack_backup import cli, tarstream
from ai_stack_backup.archive import checked_members
from ai_stack_backup.errors import ArchiveError
from test_tarstream import entry, raw_tar

SEED = 20261127
HOST_CASES = 400
ENGINE_CASES = 24
KIND = {tarstream.FILE: "file", tarstream.DIRECTORY: "dir", tarstream.SYMLINK: "symlink",
        tarstream.FIFO: "fifo"}


def random_bytes(generator, count):
    """Seeded bytes (random.randbytes needs Python 3.9)."""
    return generator.getrandbits(8 * count).to_bytes(count, "little") if count else b""


def base_entries(prefix):
    """A small tree in archive order, every parent listed; names start with ``prefix``."""
    generator = random.Random(SEED)
    entries = [entry(prefix, tarfile.DIRTYPE, mode=0o755, mtime=1_500_000_000)]
    for folder in ("a", "a/b", "c", "c/" + "long" * 30):
        entries.append(entry(prefix + folder + "/", tarfile.DIRTYPE, mode=0o750,
                             uid=1000, mtime=1_500_000_100))
    for index in range(12):
        size = generator.choice([0, 1, 511, 512, 513, 3000, 70000])
        folder = generator.choice(["", "a/", "a/b/", "c/"])
        entries.append(entry("%s%sfile%d" % (prefix, folder, index),
                             data=random_bytes(generator, size),
                             mode=generator.choice([0o644, 0o600, 0o4755]),
                             uid=generator.choice([0, 1234]), mtime=1_500_000_000 + index))
    entries += [entry(prefix + "a/link", tarfile.SYMTYPE, linkname="b/../file1", mtime=7),
                entry(prefix + "hard", tarfile.LNKTYPE, linkname=entries[5][0].name),
                entry(prefix + "fifo", tarfile.FIFOTYPE, mode=0o600, mtime=9)]
    return entries


def boundaries(raw):
    """Offsets where members start in a raw tar (and where the end marker starts)."""
    reader = tarstream.TarReader([raw])
    offsets = [0]
    for _ in reader:
        for _piece in reader.data():
            pass
        offsets.append(reader.offset + (-reader.offset % 512))
    return sorted(set(offsets))


def mutations(prefix, count):
    """Give ``count`` deterministic (description, archive bytes) pairs."""
    raw = raw_tar(base_entries(prefix))
    packed = gzip.compress(raw, 6, mtime=0)
    cuts = boundaries(raw)
    generator = random.Random(SEED + len(prefix))
    result = []
    for number in range(count):
        kind = ["truncate gzip", "flip gzip", "flip tar", "cut tar", "splice", "duplicate",
                "garbage", "flip tar header"][number % 8]
        if kind == "truncate gzip":
            data = packed[:generator.randrange(len(packed))]
        elif kind == "flip gzip":
            data = bytearray(packed)
            for _ in range(generator.randint(1, 3)):
                data[generator.randrange(len(data))] ^= 1 << generator.randrange(8)
        elif kind in ("flip tar", "flip tar header"):
            mutated = bytearray(raw)
            position = (generator.choice(cuts[:-1]) + generator.randrange(512)
                        if kind == "flip tar header" else generator.randrange(len(raw)))
            mutated[position] ^= 1 << generator.randrange(8)
            data = gzip.compress(bytes(mutated), 6, mtime=0)
        elif kind == "cut tar":
            cut = generator.choice(cuts) if generator.random() < 0.5 else \
                generator.randrange(len(raw))
            data = gzip.compress(raw[:cut], 6, mtime=0)
        elif kind == "splice":
            first, second = sorted(generator.sample(cuts[:-1], 2))
            data = gzip.compress(raw[:first] + raw[second:], 6, mtime=0)
        elif kind == "duplicate":
            start = generator.randrange(len(cuts) - 2)
            member = raw[cuts[start]:cuts[start + 1]]
            at = generator.choice(cuts[:-1])
            data = gzip.compress(raw[:at] + member + raw[at:], 6, mtime=0)
        else:
            data = packed + bytes(generator.randrange(0, 3)) + random_bytes(
                generator, generator.randint(1, 50))
        result.append(("%d %s" % (number, kind), bytes(data)))
    return result


def model(data, strip):
    """What restoring ``data`` must give: {path: entry} or None if the archive is refused."""
    state = {}
    try:
        reader, members, _ = checked_members(io.BytesIO(data))
        for member in members:
            path = member.path[len(strip):].lstrip(b"/") if strip else member.path
            key = path or b"."
            parent = b""
            for part in path.split(b"/")[:-1]:  # implicit folders: only their kind is known
                parent = parent + b"/" + part if parent else part
                state.setdefault(parent, ("dir",))
            if member.kind == tarstream.HARDLINK:
                target = member.link_path[len(strip):].lstrip(b"/") if strip else member.link_path
                state[key] = state[target or b"."]
                continue
            payload = None
            if member.kind == tarstream.FILE:
                payload = hashlib.sha256(b"".join(bytes(p) for p in reader.data())).hexdigest()
            elif member.kind == tarstream.SYMLINK:
                payload = member.linkname
            mode = 0o777 if member.kind == tarstream.SYMLINK else member.mode  # Linux ignores it
            state[key] = (KIND[member.kind], oct(mode), member.uid, member.gid,
                          member.mtime, payload)
    except ArchiveError:
        return None
    return state


def comparable(tree, expected):
    """The restored tree in the model's shape (implicit folders: kind only)."""
    return {path: (values[0],) if expected.get(path) == ("dir",) else values[:6]
            for path, values in tree.items()}


def test_mutations_are_deterministic_and_varied():
    first, second = mutations("top/", 40), mutations("top/", 40)
    assert first == second
    outcomes = {model(data, b"top") is None for _, data in first}
    assert outcomes == {True, False}  # some refused, some restorable


@pytest.mark.skipif(os.geteuid() != 0, reason="owners other than ours need root")
def test_host_restore_of_damaged_archives(tmp_path, capsys):
    target = tmp_path / "target"
    (target / "keep").mkdir(parents=True)
    (target / "keep" / "me").write_text("untouched unless a restore succeeds")
    pristine = testkit.tree_state(str(target))
    counts = {"refused": 0, "restored": 0, "refused while pristine": 0}
    for description, data in mutations("top/", HOST_CASES):
        archive = tmp_path / "case.tar.gz"
        archive.write_bytes(data)
        expected = model(data, b"top")
        before = testkit.tree_state(str(target))
        code = cli.restore_path_main([str(archive), str(target), "--force", "--quiet",
                                      "--no-safety-backup"])  # not under test here
        capsys.readouterr()
        if expected is None:
            assert code == 1, description
            assert testkit.tree_state(str(target)) == before, description
            counts["refused"] += 1
            counts["refused while pristine"] += before == pristine
        else:
            assert code == 0, description
            assert comparable(testkit.tree_state(str(target)), expected) == expected, description
            counts["restored"] += 1
        assert sorted(os.listdir(str(tmp_path))) == ["case.tar.gz", "target"], description
    assert counts["refused"] > HOST_CASES / 2 and counts["restored"] > 10
    # Some refusals were checked against the filled target, before any restore replaced it.
    assert counts["refused while pristine"] > 0 and pristine[b"keep/me"]


@pytest.mark.engine
def test_volume_restore_of_damaged_archives(helper_env, make_volume, tmp_path, capsys):
    volume = make_volume()
    (tmp_path / "start").mkdir()
    (tmp_path / "start" / "precious").write_text("the volume before the fuzzing")
    testkit.fill_volume(volume, tmp_path / "start")
    every = mutations("./", HOST_CASES)
    cases = [every[index] for index in sorted(random.Random(SEED).sample(range(HOST_CASES),
                                                                          ENGINE_CASES))]
    folder = tmp_path / "cases"
    folder.mkdir()
    seen = set()
    for description, data in cases:
        archive = folder / "case.tar.gz"
        archive.write_bytes(data)
        expected = model(data, b"")
        before = testkit.volume_state(volume)
        code = cli.restore_docker_volume_main([volume, str(archive), "--force", "--quiet",
                                               "--no-safety-backup"])
        capsys.readouterr()
        if expected is None:
            assert code == 1, description
            assert testkit.volume_state(volume) == before, description
        else:
            assert code == 0, description
            restored = testkit.volume_state(volume)
            assert comparable(restored, expected) == expected, description
        seen.add(expected is None)
        assert os.listdir(str(folder)) == ["case.tar.gz"]
    assert seen == {True, False}
