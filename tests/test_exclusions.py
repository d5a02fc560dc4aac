"""Exclusions (--exclude, BACKUP_EXCLUDE) and the shrink guard, on real volumes and paths."""

import io
import os
import re
import subprocess
import sys
import tarfile

import pytest

import testkit
from ai_stack_backup import capture
from ai_stack_backup.cli import backup_all_main, backup_docker_volume_main, backup_path_main, \
    restore_docker_volume_main, restore_path_main
from ai_stack_backup.config import Config
from ai_stack_backup.errors import ConfigError, Unrestorable
from ai_stack_backup.exclusions import Exclusions
from ai_stack_backup.names import parse_archive_name
from conftest import SCRIPTS

PATTERNS = ["cache/", "*.tmp", "/logs/old"]
# What those patterns leave out of the tree _tree_with_clutter makes (and nothing else).
EXCLUDED = {b"cache", b"cache/models", b"cache/models/m.bin", b"cache/index.json",
            b"a.tmp", b"app/backend/b.tmp", b"logs/old", b"logs/old/1.log"}


# --- the matcher ------------------------------------------------------------------

@pytest.mark.parametrize("path, is_folder, excluded", [
    ("cache", True, True),            # cache/ : the root folder cache ...
    ("cache/models/m.bin", False, True),  # ... and everything under it
    ("cache", False, False),          # a trailing / matches folders only
    ("app/cache", True, False),       # anchored at the root
    ("a.tmp", False, True),
    ("deep/er/b.tmp", False, True),   # '*' also matches '/'
    ("b.tmp.keep", False, False),
    ("logs/old", True, True),         # a leading / changes nothing
    ("logs/old/1.log", False, True),
    ("logs/older", True, False),
    ("Cache", True, False),           # case-sensitive
])
def test_what_the_patterns_exclude(path, is_folder, excluded):
    assert Exclusions(PATTERNS).excludes(path, is_folder) is excluded


def test_names_that_are_not_utf8_can_be_excluded():
    assert Exclusions(["bad-*"]).excludes(b"bad-\xff\xfe-name", False)


@pytest.mark.parametrize("pattern", ["", "/", "./", "..", "//"])
def test_a_pattern_must_name_something_below_the_root(pattern):
    with pytest.raises(ConfigError, match="names no path below the root"):
        Exclusions([pattern])


@pytest.mark.parametrize("value, problem", [
    ("owui-data", "is not SOURCE:PATTERN"),
    ("owui-data:", "is not SOURCE:PATTERN"),
    ("typo-data:cache/", "names typo-data, which backup_all does not back up"),
    ("owui-data:/", "names no path below the root"),
])
def test_backup_exclude_is_checked_against_the_sources(value, problem):
    with pytest.raises(ConfigError, match=re.escape(problem)):
        Config.from_environment({"BACKUP_EXCLUDE": value, "VOLUMES": "owui-data"},
                                backup_all=True)


def test_backup_exclude_names_volumes_and_output_root_by_path_or_archive_name():
    config = Config.from_environment({
        "VOLUMES": "owui-data tm-data", "OUTPUT_ROOT": "/srv/output",
        "BACKUP_EXCLUDE": "owui-data:cache/,tm-data:*.tmp srv_output:tmp/ /srv/output:*.part"},
        backup_all=True)
    assert config.exclusions["owui-data"].patterns == ["cache/"]
    assert config.exclusions["tm-data"].patterns == ["*.tmp"]
    assert config.exclusions["/srv/output"].patterns == ["tmp/", "*.part"]


def _tar(*members):
    """A tar stream (bytes) of (name, kind, data-or-linkname)."""
    output = io.BytesIO()
    with tarfile.open(fileobj=output, mode="w", format=tarfile.GNU_FORMAT) as archive:
        for name, kind, payload in members:
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
            else:
                info.linkname = payload
                archive.addfile(info)
    return output.getvalue()


def test_a_hard_link_whose_data_was_excluded_is_refused_by_name():
    # tar keeps a hard-linked file's data with its first name only; which name comes first
    # is up to the volume's folder order, so this is checked on a stream made to order.
    stream = _tar(("./", tarfile.DIRTYPE, ""), ("./cache/", tarfile.DIRTYPE, ""),
                  ("./cache/a", tarfile.REGTYPE, b"data"), ("./b", tarfile.LNKTYPE, "./cache/a"))
    with pytest.raises(Unrestorable, match=r'volume v1 .*"\./b" is a hard link to "\./cache/a", '
                                           r"which is excluded.*exclude both or neither"):
        capture.write_reemitted([stream], io.BytesIO(), lambda member: None, {},
                                Exclusions(["cache/"]), "v1")
    output = io.BytesIO()
    kept = capture.write_reemitted([stream], output, lambda member: None, {},
                                   Exclusions(["cache/", "b"]))
    output.seek(0)
    assert kept == 1
    assert tarfile.open(fileobj=output).getnames() == ["."]


# --- real trees -----------------------------------------------------------------------

def _tree_with_clutter(root):
    testkit.make_tricky_tree(root)
    for folder in ("cache/models", "app/cache", "logs/old", "logs/older"):
        os.makedirs(os.path.join(str(root), folder))
    for name in ("cache/models/m.bin", "cache/index.json", "a.tmp", "app/backend/b.tmp",
                 "app/cache/kept", "logs/old/1.log", "logs/older/2.log", "b.tmp.keep"):
        with open(os.path.join(str(root), name), "wb") as file:
            file.write(os.urandom(1000))
    # Creating entries moved the folders' mtimes; set them again so the tree is stable.
    for folder, _, _ in os.walk(str(root)):
        os.utime(folder, (testkit.T0, testkit.T0))
    return root


def _without(state, excluded, prefix=b""):
    return {path: entry for path, entry in state.items()
            if path[len(prefix):] not in excluded}


@pytest.mark.engine
def test_volume_exclusions_leave_paths_out_of_archive_and_restore(helper_env, make_volume,
                                                                  tmp_path, capsys):
    data = _tree_with_clutter(tmp_path / "data")
    volume, restored = make_volume(), make_volume()
    testkit.fill_volume(volume, data)
    before = testkit.volume_state(volume)
    folder = tmp_path / "backups"
    arguments = [volume, str(folder)]
    for pattern in PATTERNS:
        arguments += ["--exclude", pattern]
    assert backup_docker_volume_main(arguments + ["--quiet"]) == 0
    archive = testkit.only_archive(folder)
    with tarfile.open(archive) as opened:
        names = {os.fsencode(name[2:]) for name in opened.getnames() if name != "."}
    assert names & EXCLUDED == set()
    assert b"app/cache/kept" in names and b"logs/older/2.log" in names
    assert testkit.volume_state(volume) == before  # the source is untouched
    assert restore_docker_volume_main([restored, archive, "--force", "--quiet"]) == 0
    assert testkit.volume_state(restored) == _without(before, EXCLUDED)
    capsys.readouterr()


def test_path_exclusions_leave_paths_out_of_archive_and_restore(tmp_path):
    data = _tree_with_clutter(tmp_path / "output")
    before = testkit.tree_state(data)
    folder = tmp_path / "backups"
    arguments = [str(data), str(folder), "--quiet"]
    for pattern in PATTERNS:
        arguments += ["--exclude", pattern]
    assert backup_path_main(arguments) == 0
    archive = testkit.only_archive(folder)
    target = tmp_path / "restored" / "output"
    target.parent.mkdir()
    assert restore_path_main([archive, str(target), "--force", "--quiet"]) == 0
    assert testkit.tree_state(target) == _without(before, EXCLUDED)
    assert testkit.tree_state(data) == before


def test_a_bad_exclude_option_is_a_clear_error_and_writes_nothing(tmp_path, capsys):
    folder = tmp_path / "backups"
    assert backup_path_main([str(tmp_path), str(folder), "--exclude", "/"]) == 1
    assert "the exclusion pattern '/' names no path below the root" in capsys.readouterr().err
    assert not folder.exists()


@pytest.mark.engine
def test_backup_all_applies_backup_exclude_to_volume_and_output_root(
        helper_env, make_volume, tmp_path, monkeypatch):
    volume = make_volume()
    testkit.fill_volume(volume, _tree_with_clutter(tmp_path / "data"))
    output_root = _tree_with_clutter(tmp_path / "output")
    folder = tmp_path / "backups"
    monkeypatch.setenv("BACKUP_DIR", str(folder))
    monkeypatch.setenv("VOLUMES", volume)
    monkeypatch.setenv("OUTPUT_ROOT", str(output_root))
    # The tricky tree's webui.db is no real database; backup_all would rightly refuse it.
    monkeypatch.setenv("BACKUP_EXCLUDE", "%s:cache/ %s:*.tmp,%s:cache/ %s:*.db %s:*.db"
                       % (volume, volume, output_root, volume, output_root))
    assert backup_all_main(["--quiet"]) == 0
    archives = testkit.archives_in(folder)
    assert len(archives) == 2
    for archive in archives:
        with tarfile.open(archive) as opened:
            names = opened.getnames()
        if parse_archive_name(os.path.basename(archive))[0] == volume:
            assert not [name for name in names if name.startswith("./cache")
                        or name.endswith(".tmp")]
        else:  # the path archive holds the basename; only cache/ was excluded there
            assert not [name for name in names if name.startswith("output/cache")]
            assert "output/a.tmp" in names
        assert "app/cache/kept" in "\n".join(names)


@pytest.mark.engine
def test_shrink_guard_keeps_everything_when_a_volume_was_emptied(helper_env, make_volume,
                                                                 tmp_path, monkeypatch, capsys):
    volume = make_volume()
    data = tmp_path / "data"
    os.makedirs(str(data / "uploads"))
    for index in range(20):
        (data / "uploads" / ("file%d" % index)).write_bytes(os.urandom(20000))
    testkit.fill_volume(volume, data)
    folder = tmp_path / "backups"
    for name, value in (("BACKUP_DIR", str(folder)), ("VOLUMES", volume), ("OUTPUT_ROOT", ""),
                        ("RETENTION_DAYS", "0"), ("RETENTION_MIN_KEEP", "1")):
        monkeypatch.setenv(name, value)
    assert backup_all_main(["--quiet"]) == 0
    [good] = testkit.archives_in(folder)
    testkit.docker("run", "--rm", "--network", "none", "-v", volume + ":/volume", helper_env,
                   "sh", "-c", "rm -rf /volume/uploads/*")
    testkit.next_second()
    capsys.readouterr()
    assert backup_all_main(["--quiet"]) == 1
    captured = capsys.readouterr()
    [line] = [line for line in captured.out.splitlines() if line.startswith("SUSPICIOUS")]
    assert re.match(r"SUSPICIOUS volume %s: the new archive %s__\d{8}T\d{6}Z\.tar\.gz holds 2 "
                    r"members, 0 B uncompressed; the previous %s held 22 members, 390\.6 KiB "
                    r"\(below 50%%: was data wiped\?\); kept, and nothing of this source is "
                    r"pruned this run" % (volume, volume, os.path.basename(good)), line), line
    archives = testkit.archives_in(folder)
    assert len(archives) == 2 and good in archives  # RETENTION_MIN_KEEP=1 did not prune
    subprocess.run(["sha256sum", "-c", "--quiet"] + [os.path.basename(path) + ".sha256"
                                                    for path in archives],
                   cwd=str(folder), check=True)
    # Once the operator has looked, RETENTION_SHRINK_GUARD=0 lets the run through.
    monkeypatch.setenv("RETENTION_SHRINK_GUARD", "0")
    testkit.next_second()
    assert backup_all_main(["--quiet"]) == 0
    assert len(testkit.archives_in(folder)) == 1 and good not in testkit.archives_in(folder)


@pytest.mark.parametrize("members, data_bytes, shrunk", [
    (22, 400000, False),  # as before
    (11, 200000, False),  # half: at the limit, not below it
    (22, 20000, True),  # the same files, nearly empty: the bytes alone
    (2, 400000, True),  # one big file where there were twenty: the members alone
])
def test_the_shrink_guard_weighs_bytes_and_members_each_alone(tmp_path, members, data_bytes,
                                                              shrunk):
    from ai_stack_backup.archive import ArchiveSummary
    from ai_stack_backup.backupall import _shrunk
    from ai_stack_backup.report import Reporter
    previous = tmp_path / "v__20261201T020000Z.tar.gz"
    with tarfile.open(str(previous), "w:gz") as archive:
        for index in range(22):
            info = tarfile.TarInfo("./file%d" % index)
            info.size = 400000 // 22 + (400000 % 22 if index == 0 else 0)
            archive.addfile(info, io.BytesIO(bytes(info.size)))
    summary = ArchiveSummary(members, data_bytes, 0, 0)
    said = _shrunk(summary, str(tmp_path / "v__20261202T020000Z.tar.gz"), str(previous), 50,
                   Reporter(io.StringIO(), io.StringIO()))
    assert bool(said) == shrunk
    if shrunk:
        assert "the previous v__20261201T020000Z.tar.gz held 22 members" in said


def test_exclude_is_in_each_backup_scripts_help():
    for script in ("backup_docker_volume.py", "backup_path.py"):
        result = subprocess.run([sys.executable, os.path.join(SCRIPTS, script), "--help"],
                                capture_output=True, text=True)
        assert result.returncode == 0
        assert "--exclude PATTERN" in result.stdout and "--exclude" in \
            result.stdout.split("examples:")[1]
