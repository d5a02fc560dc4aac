"""The drop-in scripts against a real Docker engine: round trips, refusals, compatibility."""

import gzip
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest

import testkit
from ai_stack_backup import cli
from conftest import REPOSITORY, SCRIPTS

pytestmark = pytest.mark.engine

ARCHIVE_PATTERN = re.compile(r"(?P<source>.+)__\d{8}T\d{6}Z\.tar\.gz")


only_archive = testkit.only_archive


def old_backup(volume, folder, name):
    """The old backup_docker_volume.sh procedure, run in the helper image."""
    testkit.docker("run", "--rm", "--network", "none", "-v", volume + ":/volume:ro",
                   "-v", "%s:/backup" % folder, testkit.HELPER_IMAGE, "sh", "-euc",
                   "cd /volume && tar -czf /backup/%s ." % name)
    return os.path.join(folder, name)


def old_restore(volume, archive):
    """The old restore_docker_volume.sh procedure, run in the helper image."""
    testkit.docker("run", "--rm", "--network", "none", "-v", volume + ":/volume",
                   "-v", "%s:/backup:ro" % os.path.dirname(archive), testkit.HELPER_IMAGE,
                   "sh", "-euc", "rm -rf /volume/* && tar -xzf /backup/%s -C /volume"
                   % os.path.basename(archive))


@pytest.fixture
def tricky_volume(make_volume, tmp_path):
    """A volume holding the tricky tree; gives (name, its state as read back)."""
    source = testkit.make_tricky_tree(tmp_path / "source")
    volume = make_volume()
    testkit.fill_volume(volume, os.fsdecode(source))
    state = testkit.volume_state(volume)
    # The features under test really are in the volume.
    assert state[b"setuid-tool"][1:4] == ("0o4755", testkit.OTHER_UID, testkit.OTHER_GID)
    assert state[b"link-relative"][2:4] == (testkit.SYMLINK_UID, testkit.SYMLINK_GID)
    assert state[b"hard-a"][6] == (b"app/hard-b", b"hard-a")
    assert b"bad-\xff\xfe-name" in state and b"new\nline and space" in state
    assert state[b"fifo"][0] == "fifo" and state[b"empty-dir"][0] == "dir"
    return volume, state


@pytest.mark.compat
def test_round_trip_keeps_everything(helper_env, tricky_volume, make_volume, tmp_path, capsys):
    volume, original = tricky_volume
    backups = tmp_path / "backups"
    assert cli.backup_docker_volume_main([volume, str(backups)]) == 0
    archive = only_archive(backups)
    out = capsys.readouterr().out.splitlines()
    assert out == ["Backing up volume: %s" % volume, "Output: %s" % archive, "OK"]
    assert ARCHIVE_PATTERN.fullmatch(os.path.basename(archive)).group("source") == volume
    status = os.stat(archive)
    assert stat.S_IMODE(status.st_mode) == 0o600 and status.st_uid == os.getuid()
    assert stat.S_IMODE(os.stat(backups).st_mode) == 0o700
    with tarfile.open(archive) as listing:
        names = listing.getnames()
    assert names[0] in ("./", ".") and all(name.startswith("./") or name == "." for name in names)

    target = make_volume(create=False)
    assert cli.restore_docker_volume_main([target, archive, "--force"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "Restoring volume: %s" % target, "From: %s" % archive,
        "WARNING: deleting existing volume data", "OK"]
    assert testkit.volume_state(target) == original


def test_restore_leaves_nothing_else_behind(helper_env, tricky_volume, make_volume, tmp_path,
                                            capsys):
    volume, original = tricky_volume
    assert cli.backup_docker_volume_main([volume, str(tmp_path)]) == 0
    archive = only_archive(tmp_path)
    target = make_volume()
    clutter = tmp_path / "clutter"
    (clutter / ".hidden-folder").mkdir(parents=True)
    (clutter / ".hidden-folder" / "x").write_text("stale")
    (clutter / ".hidden").write_text("stale")
    (clutter / "..double").write_text("stale")
    (clutter / "app").write_text("a file where the archive has a folder")
    testkit.fill_volume(target, clutter)
    assert cli.restore_docker_volume_main([target, archive, "--force", "--no-safety-backup"]) == 0
    assert testkit.volume_state(target) == original


def test_old_archive_restores_exactly_with_new_script(helper_env, tricky_volume, make_volume,
                                                      tmp_path):
    volume, original = tricky_volume
    archive = old_backup(volume, str(tmp_path), "%s__20260118T120000Z.tar.gz" % volume)
    target = make_volume(create=False)
    assert cli.restore_docker_volume_main([target, archive, "--force"]) == 0
    assert testkit.volume_state(target) == original


def _what_busybox_keeps(state):
    """busybox tar -x sets no symlink owner or mtime, and folders get their mtime too early."""
    kept = {}
    for path, (kind, mode, uid, gid, mtime, payload, group) in state.items():
        if kind == "symlink":
            uid = gid = mtime = None
        if kind == "dir":
            mtime = None
        kept[path] = (kind, mode, uid, gid, mtime, payload, group)
    return kept


def test_new_archive_restores_with_old_procedure(helper_env, tricky_volume, make_volume,
                                                 tmp_path):
    volume, original = tricky_volume
    assert cli.backup_docker_volume_main([volume, str(tmp_path)]) == 0
    target = make_volume()
    old_restore(target, only_archive(tmp_path))
    assert _what_busybox_keeps(testkit.volume_state(target)) == _what_busybox_keeps(original)


def test_new_archive_is_the_old_layout(helper_env, tricky_volume, tmp_path):
    volume, _ = tricky_volume
    (tmp_path / "old").mkdir()
    old = old_backup(volume, str(tmp_path / "old"), "old.tar.gz")
    assert cli.backup_docker_volume_main([volume, str(tmp_path / "new")]) == 0
    new = only_archive(tmp_path / "new")
    # Both are busybox's stream of the same volume, so the tar bytes are the same.
    with gzip.open(old) as old_tar, gzip.open(new) as new_tar:
        assert old_tar.read() == new_tar.read()


def test_restore_without_force_changes_nothing(helper_env, tricky_volume, make_volume, tmp_path,
                                               capsys):
    volume, original = tricky_volume
    assert cli.backup_docker_volume_main([volume, str(tmp_path)]) == 0
    archive = only_archive(tmp_path)
    target = make_volume()
    testkit.fill_volume(target, tmp_path)  # anything, as long as it is not the archive's tree
    before = testkit.volume_state(target)
    capsys.readouterr()
    assert cli.restore_docker_volume_main([target, archive]) == 1
    error = capsys.readouterr().err
    assert error.startswith("ERROR: restore requires --force\nusage: ")
    assert cli.restore_docker_volume_main([target, archive, "--forc"]) == 2
    assert testkit.volume_state(target) == before


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "cut at member boundary"])
def test_damaged_archive_is_refused_and_changes_nothing(helper_env, tricky_volume, make_volume,
                                                        tmp_path, own_backup_dir, capsys,
                                                        damage):
    volume, original = tricky_volume
    assert cli.backup_docker_volume_main([volume, str(tmp_path)]) == 0
    archive = only_archive(tmp_path)
    data = bytearray(open(archive, "rb").read())
    if damage == "flipped byte":
        data[len(data) // 2] ^= 0x40
    elif damage == "truncated":
        data = data[:len(data) * 2 // 3]
    else:  # a valid gzip of a tar that stops right after a member: tar tools stay silent
        with gzip.open(archive) as stream:
            raw = stream.read()
        with tarfile.open(archive) as listing:
            cut = listing.getmembers()[5].offset
        data = gzip.compress(raw[:cut])
    damaged = tmp_path / "damaged" / os.path.basename(archive)
    damaged.parent.mkdir()
    damaged.write_bytes(bytes(data))
    capsys.readouterr()
    assert cli.restore_docker_volume_main([volume, str(damaged), "--force"]) == 1
    error = capsys.readouterr().err
    rules = {"flipped byte": "(gzip-crc|gzip-corrupt)", "truncated": "truncated",
             "cut at member boundary": "truncated"}
    assert re.search(r"is refused \[%s\]: .*; volume %s was not changed" % (rules[damage], volume),
                     error), error
    assert testkit.volume_state(volume) == original
    assert os.listdir(damaged.parent) == [damaged.name]  # no leftovers beside it
    assert testkit.archives_in(own_backup_dir) == []  # no safety backup where one would go
    missing = make_volume(create=False)
    assert cli.restore_docker_volume_main([missing, str(damaged), "--force"]) == 1
    assert not testkit.volume_exists(missing)


def test_missing_volume_is_an_error_and_is_not_created(helper_env, make_volume, tmp_path,
                                                       capsys):
    missing = make_volume(create=False)
    assert cli.backup_docker_volume_main([missing, str(tmp_path / "b")]) == 1
    error = capsys.readouterr().err
    assert "volume %s does not exist" % missing in error
    assert not (tmp_path / "b").exists()  # nothing is created before the checks pass
    assert not testkit.volume_exists(missing)


def test_missing_archive_and_path_keep_the_old_messages(helper_env, make_volume, tmp_path,
                                                        capsys):
    volume = make_volume()
    assert cli.restore_docker_volume_main([volume, str(tmp_path / "nope.tar.gz"), "--force"]) == 1
    assert capsys.readouterr().err == "ERROR: archive not found: %s\n" % (tmp_path / "nope.tar.gz")
    assert cli.backup_path_main([str(tmp_path / "nothing"), str(tmp_path / "b")]) == 1
    assert capsys.readouterr().err == "ERROR: path not found: %s\n" % (tmp_path / "nothing")
    assert not (tmp_path / "b").exists()


def test_restore_creates_a_missing_volume(helper_env, make_volume, tmp_path):
    volume = make_volume()
    testkit.fill_volume(volume, testkit.make_tricky_tree(tmp_path / "src").decode())
    assert cli.backup_docker_volume_main([volume, str(tmp_path / "b")]) == 0
    target = make_volume(create=False)
    assert cli.restore_docker_volume_main([target, only_archive(tmp_path / "b"), "--force"]) == 0
    assert testkit.volume_exists(target)
    assert testkit.volume_state(target) == testkit.volume_state(volume)


def test_missing_helper_image_fails_fast_and_writes_nothing(helper_env, make_volume, tmp_path,
                                                            monkeypatch, capsys):
    volume = make_volume()
    testkit.fill_volume(volume, testkit.make_tricky_tree(tmp_path / "src").decode())
    before = testkit.volume_state(volume)
    monkeypatch.setenv("BACKUP_HELPER_IMAGE", "aisb-no-such-image:never")
    assert cli.backup_docker_volume_main([volume, str(tmp_path / "b")]) == 1
    assert "helper image aisb-no-such-image:never is not available" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    archive = tmp_path / "a.tar.gz"
    with tarfile.open(archive, "w:gz") as empty:
        empty.addfile(tarfile.TarInfo("./x"))
    assert cli.restore_docker_volume_main([volume, str(archive), "--force"]) == 1
    assert testkit.volume_state(volume) == before


def test_unreachable_engine_fails_fast(helper_env, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DOCKER_HOST", "unix://%s/no-engine.sock" % tmp_path)
    assert cli.backup_docker_volume_main(["owui-data", str(tmp_path / "b")]) == 1
    error = capsys.readouterr().err
    assert "cannot list Docker volumes" in error and "no-engine.sock" in error
    assert not (tmp_path / "b").exists()


def test_shell_shims_work_from_any_folder(helper_env, make_volume, tmp_path):
    volume = make_volume()
    testkit.fill_volume(volume, testkit.make_tricky_tree(tmp_path / "src").decode())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    backup = subprocess.run(["sh", os.path.join(SCRIPTS, "backup_docker_volume.sh"), volume,
                             str(tmp_path / "b")], cwd=str(elsewhere), capture_output=True)
    assert backup.returncode == 0, backup.stderr
    assert backup.stdout.decode().splitlines()[-1] == "OK"
    target = make_volume(create=False)
    restore = subprocess.run([os.path.join(SCRIPTS, "restore_docker_volume.sh"), target, "--force",
                              only_archive(tmp_path / "b")], cwd=str(elsewhere),
                             capture_output=True)
    assert restore.returncode == 0, restore.stderr
    assert testkit.volume_state(target) == testkit.volume_state(volume)


def test_non_root_operator_owns_the_archive(helper_env, operator, make_volume, tmp_path,
                                            public_tmp):
    volume = make_volume()
    testkit.fill_volume(volume, testkit.make_tricky_tree(tmp_path / "src").decode())
    # Only the scripts folder, copied somewhere the operator can read: a complete install.
    install = os.path.join(public_tmp, "install")
    shutil.copytree(SCRIPTS, os.path.join(install, "scripts"), symlinks=True,
                    ignore=shutil.ignore_patterns("__pycache__"))
    home = os.path.join(public_tmp, "operator-home")
    os.mkdir(home)
    os.chown(home, operator.pw_uid, operator.pw_gid)
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin") or sys.executable
    result = subprocess.run(
        ["setpriv", "--reuid", str(operator.pw_uid), "--regid", str(operator.pw_gid),
         "--init-groups", python, os.path.join(install, "scripts", "backup_docker_volume.py"),
         volume, os.path.join(home, "backups")],
        capture_output=True, env=dict(os.environ, HOME=home))
    assert result.returncode == 0, result.stderr
    archive = only_archive(os.path.join(home, "backups"))
    status = os.stat(archive)
    assert (status.st_uid, status.st_gid) == (operator.pw_uid, operator.pw_gid)
    assert stat.S_IMODE(status.st_mode) == 0o600
    assert stat.S_IMODE(os.stat(os.path.join(home, "backups")).st_mode) == 0o700
    assert sorted(os.listdir(os.path.join(home, "backups"))) == [
        os.path.basename(archive), os.path.basename(archive) + ".listing",
        os.path.basename(archive) + ".sha256"]  # its member record, its checksum
    # The operator's archive restores exactly.
    target = make_volume(create=False)
    assert cli.restore_docker_volume_main([target, archive, "--force"]) == 0
    assert testkit.volume_state(target) == testkit.volume_state(volume)


def test_repository_layout_is_a_drop_in():
    for name in ("backup_docker_volume", "backup_path", "restore_docker_volume", "backup_all"):
        for suffix in (".py", ".sh"):
            path = os.path.join(SCRIPTS, name + suffix)
            assert os.access(path, os.X_OK), path
    for unit in ("ai_stack_backup.service", "ai_stack_backup.timer"):
        assert os.path.isfile(os.path.join(SCRIPTS, "systemd", unit))
        assert os.path.isfile(os.path.join(REPOSITORY, "systemd", unit))
