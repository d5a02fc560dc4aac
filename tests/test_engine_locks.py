"""One lock per volume for the whole host, on the real engine: whoever runs the command and
wherever its backup folder is; and no folder a command was not given is created or written.

Tests that need the default /srv/ai-stack run in a mount namespace of their own with a tmpfs
over /srv, so the host's /srv is never touched.
"""

import os
import shlex
import shutil
import subprocess
import sys

import pytest

import testkit
from ai_stack_backup import cli, locks
from conftest import SCRIPTS
from test_engine_hardening import backup_of, slow_image, small_volume, \
    start_slow_restore  # noqa: F401

pytestmark = pytest.mark.engine
PYTHON = sys.executable


def as_user(user, *command):
    """The argument list running ``command`` as ``user`` with its groups (docker)."""
    return ["setpriv", "--reuid", str(user.pw_uid), "--regid", str(user.pw_gid),
            "--init-groups"] + list(command)


def in_own_srv(script, home):
    """Run the shell ``script`` in a mount namespace of its own with an empty tmpfs over /srv,
    without BACKUP_DIR (the runbook's way) and with ``home`` as HOME; give the result."""
    environment = {name: value for name, value in os.environ.items() if name != "BACKUP_DIR"}
    environment["HOME"] = str(home)
    return subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "sh", "-euc",
         "mount -t tmpfs aisb-test-srv /srv\n" + script], capture_output=True, env=environment)


def test_a_non_root_operator_with_roots_backup_folder_present(helper_env, operator,
                                                              small_volume, make_volume,
                                                              public_tmp):
    """The runbook command as a docker-group user while /srv/ai-stack/backups is root's 0700
    (the runbook's own recommendation): the lock is not in a backup folder, so it works."""
    volume, original = small_volume
    target = make_volume(create=False)
    folder = os.path.join(operator.pw_dir, "backups")
    backup = as_user(operator, PYTHON, os.path.join(SCRIPTS, "backup_docker_volume.py"),
                     volume, folder)
    restore = as_user(operator, PYTHON, os.path.join(SCRIPTS, "restore_docker_volume.py"),
                      target, "--force")
    script = "\n".join([
        "install -d -m 0700 -o root -g root /srv/ai-stack/backups",
        " ".join(map(shlex.quote, backup)),
        'archive=$(ls %s/*.tar.gz)' % shlex.quote(folder),
        " ".join(map(shlex.quote, restore)) + ' "$archive"',
        "echo left: $(ls -A /srv/ai-stack/backups)"])
    result = in_own_srv(script, operator.pw_dir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[-1] == "left:"  # nothing written into root's
    assert testkit.volume_state(target) == original
    names = sorted(os.listdir(folder))
    assert len(names) == 3 and names[1:] == [names[0] + ".listing", names[0] + ".sha256"]


def test_two_restores_of_one_volume_from_two_folders_by_two_users(helper_env, operator,
                                                                  small_volume, make_volume,
                                                                  tmp_path, slow_image):
    volume, _ = small_volume
    other = make_volume()
    testkit.fill_volume(other, testkit.make_tricky_tree(tmp_path / "tricky").decode())
    expected = testkit.volume_state(other)
    archive = backup_of(other, tmp_path / "archives")  # root's folder
    operator_copy = os.path.join(operator.pw_dir, "copy.tar.gz")
    shutil.copyfile(archive, operator_copy)
    os.chown(operator_copy, operator.pw_uid, operator.pw_gid)
    first = start_slow_restore(volume, archive, slow_image)  # root, BACKUP_DIR of this test
    try:
        second = subprocess.run(
            as_user(operator, PYTHON, os.path.join(SCRIPTS, "restore_docker_volume.py"), volume,
                    operator_copy, "--force"),
            capture_output=True, env=dict(os.environ, HOME=operator.pw_dir,
                                          BACKUP_DIR=os.path.join(operator.pw_dir, "backups")))
        assert second.returncode == 75, second.stderr
        assert b"another backup or restore of volume %s (PID %d) holds the lock" % (
            volume.encode(), first.pid) in second.stderr
        during = subprocess.run(  # a backup of the volume meanwhile: never a half-restored one
            [PYTHON, os.path.join(SCRIPTS, "backup_docker_volume.py"), volume,
             str(tmp_path / "during")], capture_output=True)
        assert during.returncode == 75, during.stderr
        assert not (tmp_path / "during").exists() or testkit.archives_in(tmp_path / "during") \
            == []
    finally:
        first.kill()
        first.wait()
    # The interrupted first restore leaves the lock free: a full restore now makes the volume
    # exactly the archive.
    assert cli.restore_docker_volume_main([volume, archive, "--force", "--quiet"]) == 0
    assert testkit.volume_state(volume) == expected


@pytest.mark.parametrize("plant", ["symlink", "fifo"])
def test_a_planted_host_lock_is_refused(helper_env, small_volume, tmp_path, capsys, plant):
    volume, original = small_volume
    archive = backup_of(volume, tmp_path / "archives")
    path = locks.host_lock_path(volume)
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    if plant == "symlink":
        os.symlink(str(victim), path)
    else:
        os.mkfifo(path)
    try:
        assert cli.restore_docker_volume_main([volume, archive, "--force"]) == 1
        error = capsys.readouterr().err
        assert "the lock %s is %s" % (path, "a symbolic link; refusing to follow it"
                                      if plant == "symlink" else "not a regular file") in error
    finally:
        os.unlink(path)
    assert victim.read_text() == "precious\n"
    assert testkit.volume_state(volume) == original


def test_no_command_creates_a_folder_it_was_not_given(helper_env, small_volume, make_volume,
                                                      tmp_path):
    """Root, no BACKUP_DIR, a host without /srv/ai-stack: backup, restore (with its safety
    copy), restore_path, verify and list into/from X leave only archives and sidecars in X."""
    volume, original = small_volume
    target = make_volume()  # not empty: the restore takes a safety copy
    testkit.fill_volume(target, testkit.make_tricky_tree(tmp_path / "tricky").decode())
    folder = tmp_path / "X"
    source_tree = tmp_path / "tree"
    testkit.make_tricky_tree(source_tree / "data")
    restored_path = tmp_path / "restored"
    home = tmp_path / "home"
    home.mkdir()

    def script(name, *arguments):
        return " ".join(map(shlex.quote, [PYTHON, os.path.join(SCRIPTS, name)]
                            + [str(argument) for argument in arguments]))
    steps = "\n".join([
        script("backup_docker_volume.py", volume, folder, "--quiet"),
        'archive=$(ls %s/%s__*.tar.gz)' % (folder, volume),
        script("restore_docker_volume.py", target, "--force", "--quiet") + ' "$archive"',
        script("backup_path.py", source_tree / "data", folder, "--quiet"),
        'path_archive=$(ls %s/*data__*.tar.gz)' % folder,
        script("restore_path.py", "--force", "--quiet") + ' "$path_archive" ' + str(restored_path),
        script("verify_backup.py", "--quiet") + ' "$archive"',
        script("list_backups.py", folder),
        "test ! -e /srv/ai-stack && echo no-srv-ai-stack"])
    result = in_own_srv(steps, home)
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines()[-1] == "no-srv-ai-stack"
    names = sorted(os.listdir(str(folder)))
    archives = [name for name in names if name.endswith(".tar.gz")]
    assert len(archives) == 2
    # Each archive with its checksum and its member record.
    assert names == sorted(archives + [name + suffix for name in archives
                                       for suffix in (".listing", ".sha256")])
    assert testkit.volume_state(target) == original
    assert testkit.tree_state(str(restored_path)) == testkit.tree_state(
        str(source_tree / "data"))
    # The safety copy went to the tool's own cache folder in HOME, not into X.
    cache = home / ".cache" / "ai-stack-backup"
    assert [name for name in os.listdir(str(cache)) if name.startswith(target + "__")]
