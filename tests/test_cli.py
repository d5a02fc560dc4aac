"""Command lines: help, usage errors, exit codes, and the operator tools that need no engine."""

import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import time

import pytest

import testkit
from ai_stack_backup import cli, files
from ai_stack_backup.names import archive_name, safe_name, utc_timestamp
from conftest import SCRIPTS

MAINS = {
    "backup_docker_volume": cli.backup_docker_volume_main,
    "backup_path": cli.backup_path_main,
    "restore_docker_volume": cli.restore_docker_volume_main,
    "restore_path": cli.restore_path_main,
    "backup_all": cli.backup_all_main,
    "verify_backup": cli.verify_backup_main,
    "list_backups": cli.list_backups_main,
    "report_failure": cli.report_failure_main,
    "drill_restore": cli.drill_restore_main,
    "restore_all": cli.restore_all_main,
}
NEED_ARGUMENTS = ["backup_docker_volume", "backup_path", "restore_docker_volume",
                  "restore_path", "verify_backup"]


@pytest.mark.parametrize("name", sorted(MAINS))
def test_help_shows_real_examples(name, capsys):
    assert MAINS[name](["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: %s.py" % name) and "\nexamples:\n  " in out
    status = out[out.index("\nexit status:\n"):]
    for code in ("0", "1", "2", "75", "128+N"):
        assert "\n  %s " % code in status, code


@pytest.mark.parametrize("name", NEED_ARGUMENTS)
def test_no_arguments_is_a_usage_error(name, capsys):
    assert MAINS[name]([]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("usage: ")


def test_abbreviations_are_not_accepted(capsys):
    assert cli.restore_docker_volume_main(["v", "a.tar.gz", "--for"]) == 2
    assert cli.backup_docker_volume_main(["v", "--stop"]) == 2


def test_consistency_is_one_of_the_modes_and_says_its_default(capsys):
    assert cli.backup_docker_volume_main(["v", "--consistency", "fast"]) == 2
    assert "invalid choice: 'fast'" in capsys.readouterr().err
    assert cli.backup_docker_volume_main(["v", "--consistency", "sqlite",
                                          "--stop-containers"]) == 2
    assert "not allowed with argument" in capsys.readouterr().err
    assert cli.backup_docker_volume_main(["--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "live (the old plain copy; the default here, so the runbook's command never stops " \
        "containers by surprise)" in help_text


@pytest.mark.parametrize("script", sorted(name + ".py" for name in MAINS) +
                         ["backup_docker_volume.sh", "backup_path.sh",
                          "restore_docker_volume.sh", "backup_all.sh", "restore_all.sh"])
def test_each_script_runs_as_a_program(script):
    result = subprocess.run([os.path.join(SCRIPTS, script), "--help"], capture_output=True,
                            cwd="/", timeout=60)
    assert result.returncode == 0 and b"examples:" in result.stdout


def test_restore_needs_force_before_anything_else(tmp_path, capsys):
    assert cli.restore_docker_volume_main(["owui-data", str(tmp_path / "missing.tar.gz")]) == 1
    captured = capsys.readouterr()
    assert captured.err.startswith("ERROR: restore requires --force\nusage: restore_docker_volume")


def test_invalid_volume_names_are_refused_before_docker(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no docker at all: it must not be asked
    for name in ("/etc", "-rf", "a b", "../x"):
        assert cli.backup_docker_volume_main(["--", name, str(tmp_path)]) == 1
        assert "is not a valid Docker volume name" in capsys.readouterr().err


def test_missing_docker_is_a_clear_error_and_creates_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    assert cli.backup_docker_volume_main(["owui-data", str(tmp_path / "b")]) == 1
    captured = capsys.readouterr()
    assert "the docker command was not found in PATH" in captured.err
    assert captured.out == ""  # not even the Output: line
    assert not (tmp_path / "b").exists()


def make_archive(folder, source, timestamp, content=b"data"):
    data_folder = folder / ("data-" + timestamp)
    data_folder.mkdir()
    (data_folder / "file").write_bytes(content)
    assert cli.backup_path_main([str(data_folder), str(folder / "tmp-out")]) == 0
    produced = testkit.only_archive(folder / "tmp-out")
    os.unlink(produced + ".sha256")  # it names the produced file, not the renamed one
    final = folder / archive_name(source, timestamp)
    os.rename(str(produced), str(final))
    return str(final)


def test_verify_backup_reports_each_archive(tmp_path, capsys):
    good = make_archive(tmp_path, "owui-data", "20260118T120000Z", b"x" * 5000)
    bad = tmp_path / "bad.tar.gz"
    data = bytearray(open(good, "rb").read())
    data[-3] ^= 1  # the length field of the gzip trailer
    bad.write_bytes(bytes(data))
    not_gzip = tmp_path / "notes.tar.gz"
    not_gzip.write_text("hello")
    capsys.readouterr()
    assert cli.verify_backup_main([good]) == 0
    assert capsys.readouterr().out == \
        "OK %s: 2 members, 4.9 KiB uncompressed, no .sha256 beside it\n" % good
    assert cli.verify_backup_main([good, str(bad), str(not_gzip), str(tmp_path / "none")]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("OK ")
    assert lines[1].startswith("FAILED %s: " % bad) and "length mismatch" in lines[1]
    assert lines[2] == "FAILED %s: not a gzip file [not-gzip]" % not_gzip
    assert lines[3].startswith("FAILED %s: cannot read" % (tmp_path / "none"))


def test_list_backups_groups_by_source_and_ignores_lookalikes(tmp_path, capsys):
    folder = tmp_path / "backups"
    folder.mkdir()
    newest = utc_timestamp(time.time() - 3600)
    for source, timestamp in (("owui-data", "20260101T000000Z"), ("owui-data", newest),
                              ("tm-data", "20260105T120000Z"), ("my__vol", "20260102T000000Z")):
        (folder / archive_name(source, timestamp)).write_bytes(b"x" * 1000)
    for lookalike in ("owui-data__20261399T999999Z.tar.gz", "notes.tar.gz",
                      ".ai_stack_backup-abc.part", "owui-data__20260101T000000Z.tar.gz.bak"):
        (folder / lookalike).write_bytes(b"x")
    (folder / "dir__20260101T000000Z.tar.gz").mkdir()
    os.symlink("/etc/hostname", str(folder / "link__20260101T000000Z.tar.gz"))
    assert cli.list_backups_main([str(folder), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [(e["source"], e["timestamp"], e["newest"]) for e in entries] == [
        ("my__vol", "20260102T000000Z", True), ("owui-data", newest, True),
        ("owui-data", "20260101T000000Z", False), ("tm-data", "20260105T120000Z", True)]
    assert entries[0]["size"] == 1000 and entries[0]["path"] == str(
        folder / "my__vol__20260102T000000Z.tar.gz")
    assert cli.list_backups_main([str(folder)]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0] == "my__vol" and "%s  1000 B" % newest not in text
    assert "  %s      1000 B     1h 0m old  (newest)  (no .sha256)" % newest in text.splitlines()
    assert "lookalike" not in text and "notes" not in text and "link" not in text


def test_list_backups_shows_a_failed_copy_but_never_as_the_newest(tmp_path, capsys):
    good, later = "20260101T000000Z", "20260102T000000Z"
    (tmp_path / archive_name("owui-data", good)).write_bytes(b"x")
    (tmp_path / (archive_name("owui-data", later) + ".failed-verification")).write_bytes(b"y")
    assert cli.list_backups_main([str(tmp_path), "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [(e["timestamp"], e["newest"], e["failed_verification"]) for e in entries] == [
        (later, False, True), (good, True, False)]
    assert cli.list_backups_main([str(tmp_path)]) == 0
    assert "(failed verification: not a backup)" in capsys.readouterr().out


def test_list_backups_default_folder_comes_from_backup_dir(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BACKUP_DIR", str(tmp_path))
    (tmp_path / archive_name("x", "20260101T000000Z")).write_bytes(b"")
    assert cli.list_backups_main([]) == 0
    assert capsys.readouterr().out.startswith("x\n")


def test_backup_all_dry_run_changes_nothing(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "backups"
    folder.mkdir()
    old = folder / archive_name("home_x_output", "20200101T000000Z")
    old.write_bytes(b"x")
    for timestamp in ("20200102T000000Z", "20200103T000000Z", "20200104T000000Z"):
        (folder / archive_name("home_x_output", timestamp)).write_bytes(b"x")
    output_root = tmp_path / "home" / "x" / "output"
    output_root.mkdir(parents=True)
    monkeypatch.setenv("BACKUP_DIR", str(folder))
    monkeypatch.setenv("OUTPUT_ROOT", str(output_root))
    monkeypatch.setenv("VOLUMES", "owui-data tm-data")
    monkeypatch.setenv("PATH", str(tmp_path))  # a dry run asks no engine
    source = safe_name(str(output_root))
    for timestamp in ("20200101T000000Z", "20200102T000000Z", "20200103T000000Z",
                      "20200104T000000Z"):
        (folder / archive_name(source, timestamp)).write_bytes(b"x")
    before = sorted(os.listdir(str(folder)))
    assert cli.backup_all_main(["--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == ["would back up volume owui-data", "would back up volume tm-data",
                   "would back up path %s" % output_root,
                   "would delete %s (no rule keeps it)"
                   % (folder / archive_name(source, "20200101T000000Z"))] + [
                   "would keep %s (newest 3)" % (folder / archive_name(source, timestamp))
                   for timestamp in ("20200102T000000Z", "20200103T000000Z", "20200104T000000Z")]
    assert sorted(os.listdir(str(folder))) == sorted(before + [files.LOCK_NAME])


@pytest.mark.parametrize("level", ["fast", "0", "10"])
def test_a_bad_setting_is_named_before_anything_happens(tmp_path, capsys, monkeypatch, level):
    monkeypatch.setenv("BACKUP_GZIP_LEVEL", level)
    (tmp_path / "src").mkdir()
    assert cli.backup_path_main([str(tmp_path / "src"), str(tmp_path / "b")]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "BACKUP_GZIP_LEVEL must be a whole number from 1 to 9, not '%s'" % level \
        in captured.err
    assert not (tmp_path / "b").exists()


def test_verify_checks_every_database(tmp_path):
    good = tmp_path / "good.db"
    connection = sqlite3.connect(str(good))
    connection.execute("CREATE TABLE t (x)")
    connection.executemany("INSERT INTO t VALUES (?)", [("x" * 500,)] * 200)
    connection.commit()
    connection.close()
    damaged = tmp_path / "damaged.db"
    data = bytearray(good.read_bytes())
    data[4096 * 3:4096 * 4] = bytes(4096)  # a page of the table zeroed
    damaged.write_bytes(bytes(data))
    archive = tmp_path / "v__20260101T000000Z.tar.gz"
    with tarfile.open(str(archive), "w:gz") as opened:
        opened.add(str(good), "./data/good.db")
        opened.add(str(damaged), "./data/renamed.bin")  # found by content, not by name
    result = subprocess.run([sys.executable, os.path.join(SCRIPTS, "verify_backup.py"),
                             str(archive)], capture_output=True, timeout=60)
    out = result.stdout.decode()
    assert result.returncode == 1, out
    assert out.startswith("FAILED %s: 2 members" % archive)
    assert "  database data/good.db: integrity_check ok" in out
    assert "  database data/renamed.bin is damaged: " in out


def test_an_archive_dated_in_the_future_says_so(tmp_path, capsys):
    future = utc_timestamp(time.time() + 7200)
    (tmp_path / archive_name("owui-data", future)).write_bytes(b"x")
    assert cli.list_backups_main([str(tmp_path)]) == 0
    assert "  %s         1 B  in the future  (newest)  (no .sha256)" % future in \
        capsys.readouterr().out


def test_every_archive_has_a_checksum_that_standard_tools_check(tmp_path, capsys):
    source = tmp_path / "notes"
    source.mkdir()
    (source / "a.txt").write_text("alpha")
    folder = tmp_path / "backups"
    for _ in range(2):
        assert cli.backup_path_main([str(source), str(folder), "--quiet"]) == 0
        time.sleep(1.05)
    archives = [os.path.basename(path) for path in testkit.archives_in(folder)]
    assert sorted(os.listdir(str(folder))) == sorted(
        archives + [name + suffix for name in archives for suffix in (".sha256", ".listing")])
    check = subprocess.run("sha256sum -c *.sha256", shell=True, cwd=str(folder),
                           capture_output=True)
    assert check.returncode == 0 and check.stdout.count(b": OK") == 2, check.stdout
    capsys.readouterr()
    assert cli.list_backups_main([str(folder), "--json"]) == 0
    assert [entry["sha256"] for entry in json.loads(capsys.readouterr().out)] == [True, True]
    path = str(folder / archives[0])
    assert cli.verify_backup_main([path]) == 0
    assert capsys.readouterr().out.rstrip().endswith(", sha256 ok")
    with open(path + ".sha256", "w") as sidecar:
        sidecar.write("%s  %s\n" % ("0" * 64, archives[0]))
    assert cli.verify_backup_main([path]) == 1
    assert "does not match its checksum file %s.sha256 [checksum]" % path in \
        capsys.readouterr().out
